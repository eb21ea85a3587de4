"""Encoded images to uint8 arrays, on the host: the training crop and the eval crop.

NumPy and PIL, so they run in Grain's worker processes. Training: an
Inception-style random-resized crop and a random flip, drawn from a generator
that depends only on the example's place (`example_rng`), never on which host
or worker decodes it. Eval: the shorter side resized to `size * 256/224`, then
the centre crop. JPEGs decode at the smallest scale the crop allows.
"""

from __future__ import annotations

import io
import math

import numpy as np

__all__ = [
    "CROP_AREA",
    "CROP_RATIO",
    "EVAL_RESIZE_RATIO",
    "eval_image",
    "example_rng",
    "random_resized_crop_box",
    "train_image",
]

# Eval: resize the shorter side to image_size * 256/224 (256 for 224), centre crop image_size.
EVAL_RESIZE_RATIO = 256 / 224
# Inception-style crop (the reference ImageNet recipe): area and aspect-ratio ranges.
CROP_AREA = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def example_rng(seed: int, step: int, row: int) -> np.random.Generator:
    """The generator of one training example's augmentation: a function of its place only.

    `row` is the example's row in the global batch of `step`, so the crop and
    flip do not depend on which host or worker decodes it.
    """
    return np.random.default_rng([seed, step, row])


def random_resized_crop_box(
    rng: np.random.Generator,
    width: int,
    height: int,
    area: tuple[float, float] = CROP_AREA,
    ratio: tuple[float, float] = CROP_RATIO,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """An Inception-style crop window `(left, top, w, h)` of a `width` x `height` image.

    Up to `attempts` draws of an area fraction uniform in `area` and an aspect
    ratio log-uniform in `ratio`; the first that fits wins. If none fits, the
    largest centred window with an aspect ratio inside `ratio` (as torchvision's
    `RandomResizedCrop`).

    Examples:
      >>> left, top, w, h = random_resized_crop_box(np.random.default_rng(0), 500, 375)
      >>> 0 <= left <= 500 - w and 0 <= top <= 375 - h
      True
      >>> random_resized_crop_box(np.random.default_rng(0), 1000, 10)  # nothing fits
      (493, 0, 13, 10)
    """
    total = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target = total * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _decode_window(encoded: bytes, window, size: int):
    """The image, decoded at the smallest JPEG scale that keeps `window` >= `size` pixels.

    JPEG decoders can scale by 1/2, 1/4 or 1/8 while decoding (PIL's `draft`),
    which is most of the decode cost saved for a small crop of a large photo.

    Returns:
      `(RGB image, window as (left, top, right, bottom) in its pixels)`.
    """
    import PIL.Image

    image = PIL.Image.open(io.BytesIO(encoded))
    width, height = image.size
    left, top, w, h = window
    scale = max(size / w, size / h)
    if image.format == "JPEG" and scale < 1:
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    sx, sy = image.size[0] / width, image.size[1] / height
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    return image.convert("RGB"), box


def train_image(encoded: bytes, rng: np.random.Generator, size: int) -> np.ndarray:
    """Decode, random-resized crop to `size` x `size` (bilinear), random horizontal flip.

    Args:
      encoded: JPEG or PNG bytes (grey, CMYK and palette images become RGB).
      rng: the example's generator (`example_rng`).
      size: output height and width.

    Returns:
      uint8 array `(size, size, 3)`.
    """
    import PIL.Image

    with PIL.Image.open(io.BytesIO(encoded)) as probe:
        width, height = probe.size
    window = random_resized_crop_box(rng, width, height)
    image, box = _decode_window(encoded, window, size)
    out = np.asarray(image.resize((size, size), PIL.Image.BILINEAR, box=box))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def eval_image(encoded: bytes, size: int) -> np.ndarray:
    """Resize the shorter side to `size * 256/224`, then centre crop `size` x `size`.

    Done as one bilinear (antialiased) resample of the centre window of the
    original image, which is the same geometry as resizing and then cropping,
    at a fraction of the work.

    Returns:
      uint8 array `(size, size, 3)`.
    """
    import PIL.Image

    with PIL.Image.open(io.BytesIO(encoded)) as probe:
        width, height = probe.size
    side = min(width, height) * size / (size * EVAL_RESIZE_RATIO)
    window = ((width - side) / 2, (height - side) / 2, side, side)
    image, box = _decode_window(encoded, window, size)
    return np.asarray(image.resize((size, size), PIL.Image.BILINEAR, box=box))
