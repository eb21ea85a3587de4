"""The small datasets, read whole into host memory: CIFAR-10/100, MNIST, Fashion-MNIST.

`load` reads a split as uint8 NHWC arrays (`ArrayDataset`) from local IDX files
(the Debian and MNIST layout), CIFAR archives, TFDS in ArrayRecord format
(`tfds.data_source`, no TensorFlow) or synthetic images for tests and
benchmarks; a missing dataset raises `DataNotFoundError` with the places tried
and the command that fetches it.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import tarfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath
from flax import struct as flax_struct

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIRS",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "NUM_CLASSES",
    "SOURCES",
    "ArrayDataset",
    "DataNotFoundError",
    "image_shape",
    "load",
    "read_idx",
    "tfds_data_source",
]

DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist")
SOURCES = ("auto", "idx", "cifar_archive", "tfds", "synthetic")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "fashion_mnist": 10}

# Native image shapes; `prepare` pads the 28x28 ones to the models' 32x32.
_SHAPES = {
    "cifar10": (32, 32, 3),
    "cifar100": (32, 32, 3),
    "mnist": (28, 28, 1),
    "fashion_mnist": (28, 28, 1),
}
_LOCAL_SOURCE = {
    "cifar10": "cifar_archive",
    "cifar100": "cifar_archive",
    "mnist": "idx",
    "fashion_mnist": "idx",
}
DEFAULT_DATA_DIRS = {
    "mnist": "/usr/share/datasets/mnist",
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",  # Debian dataset-fashion-mnist
}

IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension

# IDX type codes (third magic byte); multi-byte types are big-endian.
_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_CIFAR_ARCHIVES = {
    # name: (archive file, folder inside it, {split: member files}, label key)
    "cifar10": (
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        "labels",
    ),
    "cifar100": (
        "cifar-100-python.tar.gz",
        "cifar-100-python",
        {"train": ["train"], "test": ["test"]},
        "fine_labels",
    ),
}
_SYNTHETIC_SIZES = {"train": 1024, "test": 512}


class DataNotFoundError(FileNotFoundError):
    """A dataset could not be found by any of the sources tried.

    The message lists what was tried and every way to provide the data.
    """


class _SourceUnavailable(Exception):
    """One source cannot provide the data; `load` turns it into `DataNotFoundError`."""


@flax_struct.dataclass
class ArrayDataset:
    """A dataset split held in memory as whole arrays.

    A pytree whose leaves are `images` and `labels`, so `jax.device_put(ds)` moves
    both to the device while `num_classes` and `name` stay static.

    Attributes:
      images: uint8 array of shape (N, H, W, C).
      labels: int32 array of shape (N,), values in [0, num_classes).
      num_classes: number of classes.
      name: dataset name, e.g. "cifar10"; selects the `normalize` statistics.
    """

    images: Any
    labels: Any
    num_classes: int = flax_struct.field(pytree_node=False)
    name: str = flax_struct.field(pytree_node=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load(
    name: str,
    *,
    source: str = "auto",
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    synthetic_size: int | None = None,
    download: bool = False,
) -> ArrayDataset:
    """Loads a whole split of a small dataset into host memory.

    Images keep their native size (28x28x1 for MNIST-likes); use `prepare` to pad
    them to the models' 32x32 input.

    Args:
      name: one of `DATASETS`: "cifar10", "cifar100", "mnist", "fashion_mnist".
      source: where to read from, one of `SOURCES`:
        "idx": a directory of MNIST-format IDX files, plain or gzipped
        (MNIST-likes only; `data_dir` defaults to `DEFAULT_DATA_DIRS[name]`).
        "cifar_archive": the CIFAR python archive `cifar-10-python.tar.gz` /
        `cifar-100-python.tar.gz` in `data_dir`, or its extracted folder.
        "tfds": a TFDS dataset prepared in ArrayRecord format in TFDS's `data_dir`,
        read with `tfds.data_source` (no TensorFlow).
        "synthetic": deterministic random data for tests and benchmarks only.
        "auto": the local source for `name`, then "tfds"; the first that works.
      data_dir: directory holding the data, local or in a bucket (`gs://...`); its
        meaning depends on `source`.
      split: "train" or "test". The "tfds" source also accepts TFDS split strings
        such as "train[:90%]".
      synthetic_size: number of examples for `source="synthetic"` (default 1024
        for "train", 512 otherwise).
      download: let TFDS download and prepare the dataset if it is missing (TFDS's
        builders need TensorFlow for that one-time step).

    Returns:
      An `ArrayDataset` with uint8 NHWC images and int32 labels.

    Raises:
      ValueError: unknown `name`, `source` or `split`, a source that does not apply
        to `name`, or malformed files.
      DataNotFoundError: the data is not where the source(s) looked. The message
        lists every way to provide it.
    """
    if name not in DATASETS:
        raise ValueError(
            f"load: unknown dataset {name!r}; known small datasets: {', '.join(DATASETS)} "
            "(imagenet2012 is streamed: see ImageFolder and TfdsImages)."
        )
    if source not in SOURCES:
        raise ValueError(f"load: unknown source {source!r}; valid sources: {', '.join(SOURCES)}.")
    if source in ("idx", "cifar_archive") and source != _LOCAL_SOURCE[name]:
        raise ValueError(
            f"load: source {source!r} does not apply to {name}; use "
            f"{_LOCAL_SOURCE[name]!r}, 'tfds', 'synthetic' or 'auto'."
        )
    if source != "tfds" and split not in ("train", "test"):
        raise ValueError(
            f"load: split {split!r} is not available from source {source!r}; use 'train' or "
            "'test' (TFDS split strings like 'train[:90%]' need source='tfds')."
        )

    if source == "synthetic":
        return _load_synthetic(name, split, synthetic_size)
    if source == "tfds":
        try:
            return _load_tfds(name, split, data_dir, download)
        except _SourceUnavailable as e:
            raise DataNotFoundError(_not_found_message(name, split, [f"tfds: {e}"])) from None
    if source != "auto":
        try:
            return _LOCAL_LOADERS[source](name, split, data_dir)
        except _SourceUnavailable as e:
            raise DataNotFoundError(_not_found_message(name, split, [f"{source}: {e}"])) from None

    tried = []
    local = _LOCAL_SOURCE[name]
    try:
        return _LOCAL_LOADERS[local](name, split, data_dir)
    except _SourceUnavailable as e:
        tried.append(f"{local}: {e}")
    try:
        return _load_tfds(name, split, data_dir, download)
    except (_SourceUnavailable, ValueError) as e:
        tried.append(f"tfds: {e}")
    raise DataNotFoundError(_not_found_message(name, split, tried))


def _not_found_message(name: str, split: str, tried: Sequence[str]) -> str:
    """The one message that says what was tried and how to provide the data."""
    ways = []
    if name == "fashion_mnist":
        ways.append(
            "apt-get install dataset-fashion-mnist (IDX files in "
            "/usr/share/datasets/fashion-mnist), then --config.dataset.source=idx"
        )
    if _LOCAL_SOURCE[name] == "idx":
        ways.append(
            "--config.dataset.data_dir=DIR --config.dataset.source=idx, with DIR holding the "
            "IDX files train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (plain or .gz)"
        )
    else:
        archive, folder, _, _ = _CIFAR_ARCHIVES[name]
        ways.append(
            f"download https://www.cs.toronto.edu/~kriz/{archive} into DIR (or extract it "
            f"there, giving DIR/{folder}) and set --config.dataset.data_dir=DIR "
            "--config.dataset.source=cifar_archive"
        )
    ways.append(
        f"tfds build {name} --file_format=array_record [--data_dir=DIR] once (TFDS's build "
        "step needs TensorFlow; training does not), then --config.dataset.source=tfds "
        "[--config.dataset.data_dir=DIR]"
    )
    ways.append("--config.dataset.source=synthetic for random stand-in data (tests, benchmarks)")
    lines = [f"Could not load {name} (split={split!r}).", "Tried:"]
    lines += [f"  - {t}" for t in tried]
    lines.append("Ways to provide the data:")
    lines += [f"  - {w}" for w in ways]
    return "\n".join(lines)


def _load_synthetic(name: str, split: str, size: int | None) -> ArrayDataset:
    """Deterministic random images and labels, seeded by (name, split)."""
    n = _SYNTHETIC_SIZES.get(split, _SYNTHETIC_SIZES["test"]) if size is None else size
    if n < 0:
        raise ValueError(f"load: synthetic_size must be >= 0, got {n}.")
    # crc32, unlike hash(), is stable across processes, so the data is too.
    rng = np.random.default_rng([zlib.crc32(name.encode()), zlib.crc32(split.encode())])
    images = rng.integers(0, 256, (n, *_SHAPES[name]), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES[name], (n,), dtype=np.int32)
    return ArrayDataset(images, labels, NUM_CLASSES[name], name)


def _load_tfds(
    name: str, split: str, data_dir: str | os.PathLike | None, download: bool
) -> ArrayDataset:
    """A whole split of a TFDS dataset prepared in ArrayRecord format, read without TensorFlow."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=None if data_dir is None else str(data_dir))
    if not builder.is_prepared():
        if not download:
            raise _SourceUnavailable(
                f"TFDS dataset {name} is not prepared in {builder.data_dir} (download=False)"
            )
        builder.download_and_prepare(file_format="array_record")
    source = tfds_data_source(builder, name, split, decode_images=True)
    records = source.__getitems__(list(range(len(source)))) if len(source) else []
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return ArrayDataset(images, labels, NUM_CLASSES[name], name)


def tfds_data_source(builder, name: str, split: str, *, decode_images: bool):
    """The ArrayRecord data source of a prepared builder, or one clear error.

    Reading ArrayRecord needs no TensorFlow: TFDS deserializes the examples with
    its own protobuf copy and decodes images with PIL.
    """
    import tensorflow_datasets as tfds

    decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
    try:
        return builder.as_data_source(split=split, decoders=decoders)
    except NotImplementedError as e:
        raise ValueError(
            f"TFDS dataset {name} in {builder.data_dir} is not in ArrayRecord format ({e}). "
            f"Rebuild it once as ArrayRecord: `tfds build {name} --file_format=array_record "
            "--data_dir=DIR` (see the README), then set --config.dataset.data_dir=DIR."
        ) from None


def read_idx(path: str | os.PathLike, *, expected_magic: int | None = None) -> np.ndarray:
    """Reads an IDX file (the MNIST format), plain or gzip-compressed.

    Args:
      path: the file, local or in a bucket (`etils.epath`). Compression is
        detected from its content, not its name.
      expected_magic: if given, the file's 4-byte magic number must equal it, e.g.
        `IDX_IMAGES_MAGIC` (0x00000803) or `IDX_LABELS_MAGIC` (0x00000801).

    Returns:
      The array with the file's dimensions, in native byte order.

    Raises:
      ValueError: not an IDX file, a different magic number than expected, or a
        size that does not match the header. The message names the file.

    Examples:
      >>> import pathlib, tempfile
      >>> path = pathlib.Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
      >>> _ = path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 9]))
      >>> read_idx(path, expected_magic=IDX_LABELS_MAGIC)
      array([7, 2, 9], dtype=uint8)
    """
    path = epath.Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        raw = gzip.decompress(raw)
    if len(raw) < 4:
        raise ValueError(f"read_idx: {path} is too short ({len(raw)} bytes) to be an IDX file.")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"read_idx: {path} has IDX magic number 0x{magic:08x}, expected "
            f"0x{expected_magic:08x}; wrong or corrupt file?"
        )
    if raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"read_idx: {path} is not an IDX file (magic number 0x{magic:08x}).")
    ndim, header = raw[3], 4 + 4 * raw[3]
    if len(raw) < header:
        raise ValueError(f"read_idx: {path} is truncated inside its header.")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) - header != math.prod(dims) * dtype.itemsize:
        raise ValueError(
            f"read_idx: {path} holds {len(raw) - header} data bytes, but its header "
            f"{dims} of {dtype} needs {math.prod(dims) * dtype.itemsize}."
        )
    data = np.frombuffer(raw, dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))  # a writable copy in native order


def _find_file(directory: epath.Path, stems: Sequence[str]) -> epath.Path | None:
    for stem in stems:
        for candidate in (directory / stem, directory / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _load_idx(name: str, split: str, data_dir: str | os.PathLike | None) -> ArrayDataset:
    """MNIST-likes from a directory of IDX files (local or in a bucket)."""
    directory = epath.Path(data_dir if data_dir is not None else DEFAULT_DATA_DIRS[name])
    prefix = "train" if split == "train" else "t10k"
    # Some mirrors name the files "train-images.idx3-ubyte".
    image_stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"]
    label_stems = [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"]
    image_path = _find_file(directory, image_stems)
    label_path = _find_file(directory, label_stems)
    if image_path is None or label_path is None:
        missing = image_stems[0] if image_path is None else label_stems[0]
        raise _SourceUnavailable(f"no {missing}[.gz] in {directory}")
    images = read_idx(image_path, expected_magic=IDX_IMAGES_MAGIC)
    labels = read_idx(label_path, expected_magic=IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"load: {image_path} has {images.shape[0]} images but {label_path} has "
            f"{labels.shape[0]} labels."
        )
    return ArrayDataset(images[..., None], labels.astype(np.int32), NUM_CLASSES[name], name)


def _unpickle_cifar(fileobj: Any, label_key: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: (N, 3072) channel-major rows to NHWC uint8."""
    # The archives were pickled by Python 2: keys come back as bytes. Only load
    # archives from a trusted source; unpickling can run arbitrary code.
    batch = pickle.load(fileobj, encoding="bytes")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise ValueError(f"load: {where} lacks the 'data' or {label_key!r} entry.")
    data = np.asarray(batch["data"], np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"load: {where} has data of shape {data.shape}, expected (N, 3072).")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(batch[label_key], np.int32)


def _load_cifar_archive(name: str, split: str, data_dir: str | os.PathLike | None) -> ArrayDataset:
    """CIFAR from the python archive, compressed or extracted (local or in a bucket)."""
    archive, folder, members, label_key = _CIFAR_ARCHIVES[name]
    wanted = members[split]
    if data_dir is None:
        raise _SourceUnavailable(f"no data_dir given to look for {archive} in")
    directory = epath.Path(data_dir)
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if (directory / archive).is_file():
        # Streams the members out of the archive: nothing is extracted to disk.
        with (directory / archive).open("rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and member.name.startswith(folder):
                    with tar.extractfile(member) as f:
                        parts[base] = _unpickle_cifar(f, label_key, f"{archive}:{member.name}")
        missing = [m for m in wanted if m not in parts]
        if missing:
            raise ValueError(f"load: {directory / archive} lacks {folder}/{missing[0]}.")
    else:
        # Accept both DIR/<folder>/<member> and data_dir pointing at <folder> itself.
        for base_dir in (directory / folder, directory):
            if all((base_dir / m).is_file() for m in wanted):
                for m in wanted:
                    with (base_dir / m).open("rb") as f:
                        parts[m] = _unpickle_cifar(f, label_key, str(base_dir / m))
                break
        else:
            raise _SourceUnavailable(f"neither {archive} nor {folder}/{wanted[0]} in {directory}")
    images = np.concatenate([parts[m][0] for m in wanted])
    labels = np.concatenate([parts[m][1] for m in wanted])
    return ArrayDataset(images, labels, NUM_CLASSES[name], name)


_LOCAL_LOADERS = {"idx": _load_idx, "cifar_archive": _load_cifar_archive}


def image_shape(name: str) -> tuple[int, int, int]:
    """`(H, W, C)` of a small dataset's images as stored, before `prepare` pads them.

    Raises:
      ValueError: `name` is not one of `DATASETS`.

    Examples:
      >>> image_shape("fashion_mnist")
      (28, 28, 1)
    """
    if name not in _SHAPES:
        raise ValueError(f"image_shape: unknown dataset {name!r}; known: {', '.join(DATASETS)}.")
    return _SHAPES[name]
