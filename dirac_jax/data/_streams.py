"""Streamed datasets (ImageNet): encoded images handed out one at a time, by index.

`ImageFolder` reads an image tree in the ImageNet layout (`split/class/*.JPEG`),
local or in a bucket; `TfdsImages` reads TFDS in ArrayRecord format with
`tfds.data_source`. Neither decodes: `dirac_jax.input_pipeline` decodes in
Grain worker processes (`data.train_image`, `data.eval_image`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from etils import epath

from dirac_jax.data._datasets import DataNotFoundError, tfds_data_source

__all__ = [
    "IMAGE_EXTENSIONS",
    "STREAMED_DATASETS",
    "STREAM_SOURCES",
    "ImageFolder",
    "TfdsImages",
    "folder_classes",
    "open_stream",
]

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


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
        self._source = tfds_data_source(builder, name, split, decode_images=False)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = self._source[int(index)]
        return {"image": record["image"], "label": int(record["label"])}


STREAM_SOURCES = ("folder", "tfds")
# Datasets too large for the devices' memory: streamed from one of `STREAM_SOURCES`.
STREAMED_DATASETS = ("imagenet2012",)


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
