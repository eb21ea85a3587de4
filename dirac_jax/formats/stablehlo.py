"""A folded net as portable StableHLO: `jax.export` with the weights as constants.

`export_stablehlo` serializes `images -> logits` (a `dirac_jax.folded.FoldedNet`
or any pure JAX function), so the artifact runs without the Python model code;
`load_stablehlo` turns it back into a callable. Serialization needs the
`flatbuffers` package.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dirac_jax.fold import apply_folded
from dirac_jax.folded import FoldedNet

__all__ = ["export_stablehlo", "load_stablehlo"]


def _serialization_hint(e: ImportError) -> ImportError:
    return ImportError(
        f"jax.export serialization needs the flatbuffers package ({e}); install it with "
        "`pip install flatbuffers`."
    )


def export_stablehlo(
    folded: FoldedNet | Callable[[jax.Array], jax.Array],
    example_shape: Sequence[int],
    *,
    dtype=jnp.float32,
    polymorphic_batch: bool = True,
    platforms: Sequence[str] | None = None,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
) -> bytes:
    """Serializes `apply_folded(folded, images)` with `jax.export`, weights included.

    The artifact is StableHLO with the folded parameters as constants, so it runs
    without the Python model code: `load_stablehlo` in JAX, or any StableHLO
    runtime. Serialization needs the `flatbuffers` package.

    Example (not a doctest, since flatbuffers is optional)::

      blob = export_stablehlo(fold(model, variables), (1, 224, 224, 3))
      logits = load_stablehlo(blob)(images)  # any batch size

    Args:
      folded: a `FoldedNet`, or any pure function `images -> logits` (e.g. a
        WRN with its kernels folded by `fold.fold_kernels`, its variables
        closed over).
      example_shape: NHWC input shape `(batch, height, width, channels)`; height,
        width and channels are fixed in the artifact.
      dtype: input dtype.
      polymorphic_batch: export the batch dimension as a symbolic `b`, so one
        artifact serves every batch size; else the batch is `example_shape[0]`.
      platforms: e.g. `("cpu", "cuda")` to run on several backends; default:
        the current backend.
      preprocess: a pure JAX function run on the input first, e.g. the uint8
        padding and normalization of `dirac_jax.workdir.preprocess`, so the
        artifact is the whole classifier (then pass `dtype=jnp.uint8`).

    Returns:
      The serialized `jax.export.Exported`.

    Raises:
      ValueError: `example_shape` is not four positive ints.
      ImportError: flatbuffers is not installed.
    """
    shape = tuple(example_shape)
    if len(shape) != 4 or not all(isinstance(d, int | np.integer) and d > 0 for d in shape):
        raise ValueError(
            f"export_stablehlo: example_shape must be NHWC (batch, height, width, channels) "
            f"positive ints, got {example_shape!r}."
        )
    if polymorphic_batch:
        spec = jax.export.symbolic_shape("b, " + ", ".join(str(int(d)) for d in shape[1:]))
    else:
        spec = tuple(int(d) for d in shape)
    prepare = preprocess if preprocess is not None else (lambda images: images)
    net = folded if callable(folded) else functools.partial(apply_folded, folded)
    fn = jax.jit(lambda images: net(prepare(images)))
    exported = jax.export.export(fn, platforms=platforms)(jax.ShapeDtypeStruct(spec, dtype))
    try:
        return bytes(exported.serialize())
    except ImportError as e:
        raise _serialization_hint(e) from e


def load_stablehlo(blob: bytes) -> Callable[[jax.Array], jax.Array]:
    """The callable `images -> logits` of an `export_stablehlo` artifact.

    Raises:
      ImportError: flatbuffers is not installed.
    """
    try:
        exported = jax.export.deserialize(bytearray(blob))
    except ImportError as e:
        raise _serialization_hint(e) from e
    return exported.call
