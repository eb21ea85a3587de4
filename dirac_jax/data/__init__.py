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
decodes and augments them (`train_image`, `eval_image`) in Grain worker
processes. No reader needs TensorFlow.

Readers apart from transforms, one module each: `_datasets` (the small datasets'
readers), `_transforms` (pad, normalize, augment), `_batches` (batch indices),
`_streams` (the streamed readers) and `_decode` (encoded images to arrays).

Typical use for a small dataset::

  ds = prepare(load("cifar10", split="train"))
  images, labels = jax.device_put((ds.images, ds.labels))
  epoch, start = divmod(global_step, steps_per_epoch(len(ds), batch_size))
  for idx in train_batches(len(ds), batch_size, seed, epoch, start_step=start):
    state = train_step(state, images[idx], labels[idx], key)  # augment + normalize inside
"""

from dirac_jax.data._batches import (
    epoch_permutation,
    eval_batches,
    steps_per_epoch,
    train_batches,
)
from dirac_jax.data._datasets import (
    DATASETS,
    DEFAULT_DATA_DIRS,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    NUM_CLASSES,
    SOURCES,
    ArrayDataset,
    DataNotFoundError,
    image_shape,
    load,
    read_idx,
    tfds_data_source,
)
from dirac_jax.data._decode import (
    CROP_AREA,
    CROP_RATIO,
    EVAL_RESIZE_RATIO,
    eval_image,
    example_rng,
    random_resized_crop_box,
    train_image,
)
from dirac_jax.data._streams import (
    IMAGE_EXTENSIONS,
    STREAM_SOURCES,
    STREAMED_DATASETS,
    ImageFolder,
    TfdsImages,
    folder_classes,
    open_stream,
)
from dirac_jax.data._transforms import (
    MEAN_STD,
    augment,
    normalize,
    pad_to,
    prepare,
)

__all__ = [
    "CROP_AREA",
    "CROP_RATIO",
    "DATASETS",
    "DEFAULT_DATA_DIRS",
    "EVAL_RESIZE_RATIO",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IMAGE_EXTENSIONS",
    "MEAN_STD",
    "NUM_CLASSES",
    "SOURCES",
    "STREAMED_DATASETS",
    "STREAM_SOURCES",
    "ArrayDataset",
    "DataNotFoundError",
    "ImageFolder",
    "TfdsImages",
    "augment",
    "epoch_permutation",
    "eval_batches",
    "eval_image",
    "example_rng",
    "folder_classes",
    "image_shape",
    "load",
    "normalize",
    "open_stream",
    "pad_to",
    "prepare",
    "random_resized_crop_box",
    "read_idx",
    "steps_per_epoch",
    "tfds_data_source",
    "train_batches",
    "train_image",
]
