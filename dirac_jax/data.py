"""Dataset readers: small datasets held in memory, and encoded images streamed from disk.

Small datasets (CIFAR-10/100, MNIST, Fashion-MNIST) are loaded once on the host
as uint8 NHWC arrays (`load`), zero-padded to the 32x32 input the models expect
(`prepare`), and then live on the device. Each training step gathers a batch by
index (`train_batches` / `eval_batches` hand out the indices), augments it
(`augment`) and normalizes it (`normalize`) inside the jitted step, so the host
does no per-step work and a run resumes exactly from its global step.

ImageNet is too large for that. Its readers, `ImageFolder` (an image tree on
disk or a bucket) and `TfdsImages` (TFDS in ArrayRecord format, read with
`tfds.data_source`), hand out encoded images by index; `dirac_jax.input_pipeline`
decodes and augments them in Grain worker processes. No reader needs TensorFlow.

Typical use for a small dataset::

  ds = prepare(load("cifar10", split="train"))
  images, labels = jax.device_put((ds.images, ds.labels))
  epoch, start = divmod(global_step, steps_per_epoch(len(ds), batch_size))
  for idx in train_batches(len(ds), batch_size, seed, epoch, start_step=start):
    state = train_step(state, images[idx], labels[idx], key)  # augment + normalize inside
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import struct as flax_struct

__all__ = [
    "DATASETS",
    "DEFAULT_DATA_DIRS",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "MEAN_STD",
    "NUM_CLASSES",
    "SOURCES",
    "ArrayDataset",
    "DataNotFoundError",
    "augment",
    "epoch_permutation",
    "eval_batches",
    "folder_classes",
    "image_shape",
    "load",
    "normalize",
    "pad_to",
    "prepare",
    "read_idx",
    "steps_per_epoch",
    "train_batches",
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

# Per-channel mean/std of the training images, on the [0, 1] scale. CIFAR-100 uses the
# CIFAR-10 statistics, as the DiracNets reference code does; they differ by < 2/255.
_CIFAR_MEAN = tuple(v / 255 for v in (125.3, 123.0, 113.9))
_CIFAR_STD = tuple(v / 255 for v in (63.0, 62.1, 66.7))
MEAN_STD = {
    "cifar10": (_CIFAR_MEAN, _CIFAR_STD),
    "cifar100": (_CIFAR_MEAN, _CIFAR_STD),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
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


# ---------------------------------------------------------------------------
# Loading small datasets.


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
    source = _tfds_data_source(builder, name, split, decode_images=True)
    records = source.__getitems__(list(range(len(source)))) if len(source) else []
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    return ArrayDataset(images, labels, NUM_CLASSES[name], name)


def _tfds_data_source(builder, name: str, split: str, *, decode_images: bool):
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


def pad_to(images: np.ndarray, size: int = 32) -> np.ndarray:
    """Zero-pads NHWC images on the host, centred, to `size` x `size`.

    An odd difference puts the extra row/column at the bottom/right.

    Args:
      images: array of shape (N, H, W, C) with H, W <= size.
      size: target height and width.

    Returns:
      A numpy array of shape (N, size, size, C) and the dtype of `images`.

    Raises:
      ValueError: `images` is not 4-D or is larger than `size`.

    Examples:
      >>> pad_to(np.ones((2, 28, 28, 1), np.uint8)).shape
      (2, 32, 32, 1)
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] > size or images.shape[2] > size:
        raise ValueError(f"pad_to: expected (N, H, W, C) with H, W <= {size}, got {images.shape}.")
    dh, dw = size - images.shape[1], size - images.shape[2]
    return np.pad(images, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))


def prepare(dataset: ArrayDataset, image_size: int = 32) -> ArrayDataset:
    """Pads a loaded dataset's images to `image_size` (MNIST-likes: 28 -> 32).

    Padding is done here, once on the host, rather than in the training step: the
    zero border is the same every step, so redoing it per step is wasted work, and
    the array that goes to the device already has the models' input shape, so
    `augment` reflect-pads 32x32 images like it does for CIFAR.

    Args:
      dataset: as returned by `load`.
      image_size: the models' input height and width.

    Returns:
      `dataset` unchanged if its images already have that size, else a copy with
      zero-padded images.

    Raises:
      ValueError: the images are larger than `image_size`.
    """
    if dataset.images.shape[1:3] == (image_size, image_size):
        return dataset
    return dataset.replace(images=pad_to(dataset.images, image_size))


# ---------------------------------------------------------------------------
# In-step preprocessing (pure JAX, jit/vmap friendly).


def normalize(images: jax.Array, name: str) -> jax.Array:
    """Scales uint8 images to [0, 1] and standardizes each channel.

    Pure and jit-able; `name` is a Python string, so it must be static under jit.

    Args:
      images: uint8 (or float on the 0..255 scale) array of shape (..., C).
      name: a key of `MEAN_STD`, e.g. "cifar10" or "imagenet2012".

    Returns:
      float32 array, `(images / 255 - mean) / std` per channel.

    Raises:
      ValueError: unknown `name`.

    Examples:
      >>> x = normalize(jnp.full((1, 2, 2, 1), 255, jnp.uint8), "mnist")
      >>> round(float(x[0, 0, 0, 0]), 4)  # (1 - 0.1307) / 0.3081
      2.8215
    """
    if name not in MEAN_STD:
        raise ValueError(f"normalize: no statistics for {name!r}; known: {', '.join(MEAN_STD)}.")
    mean, std = MEAN_STD[name]
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(key: jax.Array, images: jax.Array, *, pad: int = 4, flip: bool = True) -> jax.Array:
    """Standard CIFAR augmentation: reflect-pad, random crop, random horizontal flip.

    Each example gets its own crop offset and flip from `key`. Pure JAX, so it runs
    inside the jitted training step; `pad` and `flip` must be static under jit.

    Args:
      key: a PRNG key.
      images: array of shape (N, H, W, C), any dtype.
      pad: pixels of reflection padding per side; the crop offset is uniform in
        [0, 2 * pad] in each direction. Must be smaller than H and W.
      flip: whether to flip each example left-right with probability 1/2.

    Returns:
      Array of the shape and dtype of `images`.

    Raises:
      ValueError: `images` is not 4-D or `pad` is negative or too large to reflect.
    """
    if images.ndim != 4:
        raise ValueError(f"augment: expected images of shape (N, H, W, C), got {images.shape}.")
    if not 0 <= pad < min(images.shape[1:3]):
        raise ValueError(f"augment: pad={pad} must be in [0, {min(images.shape[1:3])}).")
    shape = images.shape[1:]

    def one(key, image):
        crop_key, flip_key = jax.random.split(key)
        padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1)
        out = jax.lax.dynamic_slice(padded, (dy, dx, jnp.zeros_like(dy)), shape)
        if flip:
            out = jnp.where(jax.random.bernoulli(flip_key), out[:, ::-1], out)
        return out

    return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


# ---------------------------------------------------------------------------
# Batch indices for on-device datasets.


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Training steps per epoch: full batches only, the remainder is dropped.

    Args:
      n: dataset size.
      batch_size: global batch size.

    Returns:
      `n // batch_size`.

    Raises:
      ValueError: `batch_size` < 1 or larger than `n` (an epoch would have no step).

    Examples:
      >>> steps_per_epoch(50000, 128)
      390
      >>> divmod(1000, steps_per_epoch(50000, 128))  # (epoch, step in epoch) at step 1000
      (2, 220)
    """
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"steps_per_epoch: need 1 <= batch_size <= n, got {batch_size}, n={n}.")
    return n // batch_size


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the examples in one epoch, a function of (seed, epoch) only.

    Computed on the host with NumPy's PCG64 seeded by `SeedSequence([seed, epoch])`,
    so any epoch is reproduced without replaying the earlier ones (for a given
    NumPy version).

    Args:
      seed: non-negative run seed.
      epoch: non-negative epoch number.
      n: dataset size.

    Returns:
      int32 array, a permutation of `range(n)`.

    Raises:
      ValueError: negative `seed`, `epoch` or `n`.
    """
    if seed < 0 or epoch < 0 or n < 0:
        raise ValueError(f"epoch_permutation: need seed, epoch, n >= 0, got {seed}, {epoch}, {n}.")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def train_batches(
    dataset_size: int, batch_size: int, seed: int, epoch: int, start_step: int = 0
) -> Iterator[np.ndarray]:
    """Index arrays of the training batches of one epoch, optionally from mid-epoch.

    The last partial batch is dropped so every step has the same shape (one jit
    compilation). To resume exactly from global step `s`, use
    `epoch, start_step = divmod(s, steps_per_epoch(dataset_size, batch_size))`.

    Args:
      dataset_size: number of training examples.
      batch_size: global batch size.
      seed: run seed, see `epoch_permutation`.
      epoch: epoch number, see `epoch_permutation`.
      start_step: index of the first batch to yield within the epoch.

    Returns:
      An iterator of int32 arrays of shape (batch_size,): batches `start_step`,
      `start_step + 1`, ... of the epoch.

    Raises:
      ValueError: invalid sizes, or `start_step` outside [0, steps per epoch].
    """
    steps = steps_per_epoch(dataset_size, batch_size)
    if not 0 <= start_step <= steps:
        raise ValueError(f"train_batches: start_step={start_step} not in [0, {steps}].")
    order = epoch_permutation(seed, epoch, dataset_size)[: steps * batch_size]
    # An iterator rather than a generator function: argument errors surface at the call.
    return iter(order.reshape(steps, batch_size)[start_step:])


def eval_batches(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Index batches covering all `n` examples exactly once, in order.

    Every batch has the full `batch_size`, so the eval step compiles once: the last
    batch is padded with index 0 and a False mask, which the caller uses to leave
    the padding out of the metrics.

    Args:
      n: dataset size.
      batch_size: examples per batch.

    Returns:
      An iterator of `(indices, mask)`: int32 and bool arrays of shape (batch_size,).

    Raises:
      ValueError: `batch_size` < 1 or `n` < 0.

    Examples:
      >>> for indices, mask in eval_batches(5, 2):
      ...   print(indices, mask)
      [0 1] [ True  True]
      [2 3] [ True  True]
      [4 0] [ True False]
    """
    if batch_size < 1 or n < 0:
        raise ValueError(f"eval_batches: need batch_size >= 1 and n >= 0, got {batch_size}, {n}.")
    num_batches = -(-n // batch_size)
    positions = np.arange(num_batches * batch_size, dtype=np.int32)
    mask = positions < n
    indices = np.where(mask, positions, 0).astype(np.int32)
    return zip(
        indices.reshape(num_batches, batch_size), mask.reshape(num_batches, batch_size), strict=True
    )


# ---------------------------------------------------------------------------
# Streamed datasets: encoded images read one at a time (ImageNet).


class ImageFolder:
    """The encoded images of `root/<split>/<class>/*` as a random-access sequence.

    The layout ImageNet users hold on disk (`train/n01440764/*.JPEG`, and `val/`
    in the same class folders). Class indices are the positions of the class
    folder names in sorted order; the validation split takes the training split's
    classes, so the two agree. Files are listed once, sorted, so index `i` is the
    same image on every host. `root` may be local or on a bucket (`etils.epath`,
    e.g. `gs://...`).

    A record is `{"image": bytes, "label": int}`, the layout of a TFDS source
    read with `SkipDecoding` (`TfdsImages`), so one transform serves both.

    Args:
      root: the folder holding `train/` and `val/`.
      split: "train" or "val" (also "validation", the TFDS name of that split).
      classes: the class folder names (default: the sorted folders of `split`).

    Raises:
      DataNotFoundError: the split folder, its class folders or their images are
        missing; the message shows the layout expected.
      ValueError: the split has a class folder that `classes` lacks.

    Examples:
      >>> import pathlib, tempfile
      >>> root = pathlib.Path(tempfile.mkdtemp())
      >>> for name in ("train/cat/1.JPEG", "train/ant/2.jpg", "train/ant/1.JPEG"):
      ...     (root / name).parent.mkdir(parents=True, exist_ok=True)
      ...     _ = (root / name).write_bytes(b"jpeg")
      >>> folder = ImageFolder(root, "train")
      >>> folder.classes, len(folder), folder.file_name(0), folder[2]["label"]
      (('ant', 'cat'), 3, 'ant/1.JPEG', 1)
    """

    def __init__(self, root, split: str, classes: Sequence[str] | None = None):
        split = "val" if split == "validation" else split
        self.root = epath.Path(root)
        directory = self.root / split
        if not directory.is_dir():
            raise DataNotFoundError(_folder_message(self.root, f"no folder {directory}"))
        found = sorted(p.name for p in directory.iterdir() if p.is_dir())
        if classes is None:
            classes = found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(
                f"ImageFolder: {directory} has class folders the training split lacks, e.g. "
                f"{unknown[0]!r}; the val/ class folders must be a subset of train/'s."
            )
        self.classes = tuple(classes)
        names, labels = [], []
        for label, name in enumerate(self.classes):
            if name not in found:
                continue
            files = sorted(
                p.name for p in (directory / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
            )
            names += [f"{name}/{f}" for f in files]
            labels += [label] * len(files)
        if not names:
            raise DataNotFoundError(_folder_message(self.root, f"no images under {directory}"))
        self.split = split
        # Fixed-width bytes: a compact array that pickles fast to Grain's worker processes.
        self._names = np.array([n.encode() for n in names])
        self._labels = np.asarray(labels, np.int32)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self._labels)

    def file_name(self, index: int) -> str:
        return self._names[index].decode()

    def __getitem__(self, index: int) -> dict:
        path = self.root / self.split / self.file_name(index)
        return {"image": path.read_bytes(), "label": int(self._labels[index])}


IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def _folder_message(root, problem: str) -> str:
    return (
        f"Could not read an image folder at {root}: {problem}. Expected the ImageNet layout "
        "DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG (class folders named alike, e.g. "
        "n01440764); set --config.dataset.data_dir=DIR --config.dataset.source=folder."
    )


class TfdsImages:
    """A split of a TFDS image dataset in ArrayRecord format, images left encoded.

    Read with `tfds.data_source`, so no TensorFlow is needed; the records are
    `{"image": bytes, "label": int, ...}` like `ImageFolder`'s.

    Args:
      name: TFDS name, e.g. "imagenet2012".
      split: TFDS split, e.g. "train" or "validation" ("val" is accepted).
      data_dir: TFDS data directory (local or a bucket), or None for TFDS's default.

    Raises:
      DataNotFoundError: the dataset is not prepared in `data_dir`.
      ValueError: it is prepared in another format than ArrayRecord.
    """

    def __init__(self, name: str, split: str, data_dir=None):
        import tensorflow_datasets as tfds

        split = "validation" if split == "val" else split
        # Checked first: TFDS logs a warning for every missing folder it looks into.
        missing = data_dir is not None and not (epath.Path(data_dir) / name).is_dir()
        builder = None if missing else tfds.builder(name, data_dir=data_dir and str(data_dir))
        if builder is None or not builder.is_prepared():
            where = f"{data_dir}/{name}" if builder is None else builder.data_dir
            raise DataNotFoundError(
                f"TFDS dataset {name} is not prepared in {where}. Build it once in "
                f"ArrayRecord format: `tfds build {name} --file_format=array_record "
                "--data_dir=DIR` (imagenet2012 also needs --manual_dir with the ILSVRC2012 "
                "tars; see the README), then set --config.dataset.data_dir=DIR."
            )
        self.num_classes = int(builder.info.features["label"].num_classes)
        self._source = _tfds_data_source(builder, name, split, decode_images=False)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = self._source[int(index)]
        return {"image": record["image"], "label": int(record["label"])}


STREAM_SOURCES = ("folder", "tfds")


def folder_classes(root) -> tuple[str, ...]:
    """The classes of an image tree: the sorted class folder names of `root/train`.

    One listing of `train/` and none of its images: what the validation split
    alone needs to label its images as training did (`ImageFolder(root, "val",
    folder_classes(root))`), e.g. for `python -m dirac_jax.evaluate`.

    Raises:
      DataNotFoundError: there is no `root/train` folder.
    """
    directory = epath.Path(root) / "train"
    if not directory.is_dir():
        raise DataNotFoundError(_folder_message(root, f"no folder {directory}"))
    return tuple(sorted(p.name for p in directory.iterdir() if p.is_dir()))


def open_stream(name: str, source: str, split: str, data_dir=None, classes=None):
    """The reader of a streamed split: `ImageFolder` or `TfdsImages`.

    Args:
      name: the dataset, e.g. "imagenet2012" (the TFDS name for source "tfds").
      source: one of `STREAM_SOURCES`.
      split: "train", or "val"/"validation".
      data_dir: the image tree (folder) or the TFDS data directory (tfds).
      classes: for "folder", the training split's classes (see `ImageFolder`).

    Raises:
      ValueError: an unknown source, or "folder" without a `data_dir`.
      DataNotFoundError: the data is not there (see the readers).
    """
    if source == "folder":
        if data_dir is None:
            raise ValueError(
                "dataset.source='folder' needs --config.dataset.data_dir=DIR, the folder "
                "holding train/<class>/*.JPEG and val/<class>/*.JPEG."
            )
        return ImageFolder(data_dir, split, classes)
    if source == "tfds":
        return TfdsImages(name, split, data_dir)
    raise ValueError(f"unknown streamed source {source!r}; expected one of {STREAM_SOURCES}.")
