"""Transforms of small-dataset images: padding on the host, normalization and augmentation in JAX.

`prepare` zero-pads a loaded dataset to the 32x32 input the models expect, once.
`normalize` and `augment` are pure JAX (jit and vmap friendly) and run inside
the jitted train step on the gathered uint8 batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dirac_jax.data._datasets import ArrayDataset

__all__ = [
    "MEAN_STD",
    "augment",
    "normalize",
    "pad_to",
    "prepare",
]

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
