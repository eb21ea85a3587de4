"""Real images on disk for the streamed-input tests, made from Debian's Fashion-MNIST.

`write_image_tree` writes the ImageNet layout, `DIR/{train,val}/<class>/*.JPEG`, of
Fashion-MNIST images upscaled to RGB JPEGs; `write_tfds_imagenet` writes the same
images as a TFDS `imagenet2012` in ArrayRecord format. Neither needs TensorFlow or a
download.
"""

import io
import pathlib

import numpy as np

FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "boot")  # fmt: skip


def write_image_tree(root, *, per_class=(6, 3), size=64, num_classes=4) -> pathlib.Path:
    """Writes `per_class` (train, val) JPEGs of each of the first `num_classes` classes."""
    import PIL.Image

    from dirac_jax import data

    root = pathlib.Path(root)
    for split, prefix, count in (("train", "train", per_class[0]), ("val", "t10k", per_class[1])):
        images = data.read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
        labels = data.read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
        for label in range(num_classes):
            folder = root / split / f"{label:02d}_{CLASSES[label]}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(labels == label)[:count]:
                image = PIL.Image.fromarray(images[i]).resize((size, size), PIL.Image.BILINEAR)
                image.convert("RGB").save(folder / f"{split}_{i}.JPEG", quality=90)
    return root


def write_tfds_imagenet(data_dir, tree) -> pathlib.Path:
    """The images of `tree` (see `write_image_tree`) as TFDS imagenet2012, ArrayRecord format."""
    import tensorflow_datasets as tfds

    from dirac_jax import data

    tree = pathlib.Path(tree)
    classes = data.ImageFolder(tree, "train").classes

    def examples(split):
        folder = data.ImageFolder(tree, split, classes)
        for i in range(len(folder)):
            record = folder[i]
            name = folder.file_name(i)
            yield name, {"image": record["image"], "label": record["label"], "file_name": name}

    class TinyImagenet(tfds.builder_cls("imagenet2012"), skip_registration=True):
        name = "imagenet2012"

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": examples("train"), "validation": examples("val")}

    data_dir = pathlib.Path(data_dir)
    builder = TinyImagenet(data_dir=str(data_dir), file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=str(data_dir))
    builder.download_and_prepare(download_config=config)
    return data_dir


def encode_jpeg(array: np.ndarray, quality: int = 95) -> bytes:
    import PIL.Image

    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
