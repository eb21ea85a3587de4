"""The `Transform` type and shape validation shared by every parameterization."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # A pytree of arrays.


class Identity(NamedTuple):
    """The identity part of a kernel: `kernel = scale(raw) * delta + rest(raw)`.

    A layer computing in a narrow dtype uses it to keep the identity path exact:
    `scale * delta` convolved with `x` is a channel selection of `x` times
    `scale`, done in float32, beside the narrow conv of `rest` (see
    `dirac_jax.layers.param_conv`).

    Attributes:
      scale: `scale(raw)`, shape `(out,)` or `()`: the delta's per-output-channel
        factor (`a` of DiracNets eq. 5).
      rest: `rest(raw)`, the kernel without its identity part (`diag(b) W_norm`).
      sources: int array `(out, m)`: the kernel input channels whose sum output
        channel `j` reads at the centre tap `K // 2` of every spatial axis; `-1`
        pads rows with fewer than `m` sources (an all-zero delta filter has none).
    """

    scale: Callable[[Any], jax.Array]
    rest: Callable[[Any], jax.Array]
    sources: np.ndarray


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
      identity: for kernels with a Dirac identity part (`dirac`, `dirac_v1`,
        `dirac_residual`), how `apply` splits into that part and the rest;
        `None` for the others.
    """

    init: Callable[[PRNGKey], Params]
    apply: Callable[[Params], Array]
    kernel_shape: tuple[int, ...]
    num_params: int
    identity: Identity | None = None


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
