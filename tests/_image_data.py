"""Real images on disk for the streamed-input tests, made from Debian's Fashion-MNIST.

`write_image_tree` writes the ImageNet layout, `DIR/{train,val}/<class>/*.JPEG`, of
Fashion-MNIST images upscaled to RGB JPEGs; `write_tfds_imagenet` writes the same
images as a TFDS `imagenet2012` in ArrayRecord format. Neither needs TensorFlow or a
download.
"""

import io
import pathlib
import sys

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


def imagenet_cli(tree, workdir, num_steps, *extra):
    """`python -m dirac_jax.main` on configs/imagenet_dirac.py, tiny: width 0.125 at 32 px.

    lr 1e-4: the loss of each step is then a function of that step's batch (images, crops,
    flips) and hardly of the training so far, so comparing loss curves compares batch
    sequences. At larger rates, ties of ReLU and max-pool on the black backgrounds flip with
    the last bit of a sum, and runs that reduce in different orders part after a few steps.
    """
    return [
        sys.executable, "-m", "dirac_jax.main", "--config=configs/imagenet_dirac.py",
        f"--workdir={workdir}", "--config.dataset.source=folder",
        f"--config.dataset.data_dir={tree}", "--config.dataset.image_size=32",
        "--config.dataset.num_workers=0", "--config.model.width=0.125",
        "--config.half_precision=False", "--config.batch_size=8", "--config.eval_batch_size=16",
        f"--config.num_train_steps={num_steps}", "--config.lr_boundaries=()",
        "--config.learning_rate=1e-4",
        "--config.log_every_steps=1", "--config.checkpoint_every_steps=0",
        f"--config.eval_every_steps={num_steps}", *extra,
    ]  # fmt: skip


def tiny_imagenet_config(tree, num_steps):
    """The config `_imagenet_cli` builds, for in-process runs."""
    from dirac_jax.configs import imagenet_dirac

    config = imagenet_dirac.get_config()
    config.dataset.source, config.dataset.data_dir = "folder", str(tree)
    config.dataset.image_size, config.dataset.num_workers = 32, 0
    config.model.width, config.half_precision = 0.125, False
    config.batch_size, config.eval_batch_size = 8, 16
    config.num_train_steps, config.lr_boundaries = num_steps, ()
    config.learning_rate = 1e-4
    config.log_every_steps, config.checkpoint_every_steps = 1, 0
    config.eval_every_steps = num_steps
    return config
