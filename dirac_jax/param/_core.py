"""The `Transform` type and shape validation shared by every parameterization."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # A pytree of arrays.


class Transform(NamedTuple):
    """A weight parameterization: a pair of pure functions plus static facts.

    Shaped like `optax.GradientTransformation`: a factory such as `dirac` builds
    it once, in plain Python, and validates the kernel shape there. The two
    functions carry no hidden state.

    Attributes:
      init: `init(key) -> raw`, the trainable pytree (a dict of arrays).
      apply: `apply(raw) -> kernel`, the effective kernel of shape `kernel_shape`.
        Pure and differentiable; works under `jit`, `grad` and `vmap`.
      kernel_shape: the kernel shape in Flax layout `(*spatial, in, out)`.
      num_params: the number of trainable scalars in `init(key)`.
    """

    init: Callable[[PRNGKey], Params]
    apply: Callable[[Params], Array]
    kernel_shape: tuple[int, ...]
    num_params: int


def check_kernel_shape(kernel_shape: Sequence[int], what: str) -> tuple[int, ...]:
    """Returns `kernel_shape` as a tuple, or raises if it is not a conv kernel shape.

    A kernel shape is Flax's `(*spatial, in_features, out_features)` with one to
    three spatial axes and positive sizes.
    """
    try:
        shape = tuple(int(s) for s in kernel_shape)
    except TypeError as e:
        raise ValueError(
            f"{what}: kernel_shape must be a sequence of ints, got {kernel_shape!r}"
        ) from e
    if not 3 <= len(shape) <= 5:
        raise ValueError(
            f"{what}: kernel_shape {shape} must be (*spatial, in, out) with 1 to 3 spatial "
            f"axes, i.e. 3 to 5 dims; got {len(shape)} dims."
        )
    if any(s <= 0 for s in shape):
        raise ValueError(f"{what}: kernel_shape {shape} has a non-positive size.")
    return shape


def size(shape: Sequence[int]) -> int:
    """Number of elements of an array of `shape`."""
    return math.prod(shape)


def fan_in(kernel_shape: Sequence[int]) -> int:
    """Inputs feeding one output unit: all axes but the last (the output axis)."""
    return size(kernel_shape[:-1])
