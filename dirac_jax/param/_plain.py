"""Unparameterized kernels and the PlainNet recipe of Oyedotun et al.

Oyedotun et al. train very deep plain nets with batch normalization, Leaky
ReLU, a max-norm constraint `||w_j|| <= c` on every filter (their eq. 2) and
uniform initialization `U[-sqrt(6/n_in), sqrt(6/n_in)]` (their eq. 3).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from dirac_jax.param._core import Array, Transform, check_kernel_shape, fan_in, size

_INITS = ("he_normal", "uniform")


def max_norm(kernel: Array, c: float) -> Array:
    """Projects every output filter of norm above `c` onto norm `c`, PlainNet eq. 2.

    A filter is everything but the last axis. Filters with norm `<= c` are
    returned unchanged. Apply it to the kernels after each optimizer step.

    Raises:
      ValueError: if `c` is not positive.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dirac_jax.param import max_norm
      >>> max_norm(jnp.array([[3.0, 0.3], [4.0, 0.4]]), 1.0).tolist()
      [[0.6000000238418579, 0.30000001192092896], [0.800000011920929, 0.4000000059604645]]
    """
    if not c > 0:
        raise ValueError(f"max_norm: c must be > 0, got {c!r}.")
    acc = jnp.promote_types(kernel.dtype, jnp.float32)
    axes = tuple(range(kernel.ndim - 1))
    norm = jnp.sqrt(jnp.sum(jnp.square(kernel.astype(acc)), axis=axes, keepdims=True))
    # Dividing only where the norm exceeds c keeps the other filters bit-exact.
    scale = jnp.where(norm > c, c / jnp.where(norm > c, norm, 1.0), 1.0)
    return (kernel.astype(acc) * scale).astype(kernel.dtype)


def uniform_init(key: jax.Array, kernel_shape: Sequence[int], dtype=jnp.float32) -> Array:
    """`U[-sqrt(6/n_in), sqrt(6/n_in)]` with `n_in` the filter's fan-in, PlainNet eq. 3.

    Examples:
      >>> import jax
      >>> from dirac_jax.param import uniform_init
      >>> w = uniform_init(jax.random.key(0), (3, 3, 6, 4))
      >>> bool(abs(w).max() <= (6 / 54) ** 0.5)
      True
    """
    shape = tuple(int(s) for s in kernel_shape)
    limit = (6.0 / fan_in(shape)) ** 0.5
    return jax.random.uniform(key, shape, dtype, -limit, limit)


def plain(kernel_shape: Sequence[int], *, init: str = "he_normal") -> Transform:
    """An ordinary kernel: `init(key) -> {"w"}`, `apply(raw) = w`.

    The baseline of the papers: the same network with no Dirac parameterization.

    Args:
      kernel_shape: Flax layout `(*spatial, in, out)`.
      init: `"he_normal"` (`N(0, 2 / fan_in)`, He et al.) or `"uniform"`
        (`uniform_init`, the PlainNet recipe).

    Examples:
      >>> from dirac_jax.param import plain
      >>> plain((3, 3, 16, 32)).num_params
      4608
    """
    shape = check_kernel_shape(kernel_shape, "plain")
    if init not in _INITS:
        raise ValueError(f"plain: unknown init {init!r}; expected one of {_INITS}.")

    def init_fn(key):
        if init == "uniform":
            return {"w": uniform_init(key, shape)}
        return {"w": (2.0 / fan_in(shape)) ** 0.5 * jax.random.normal(key, shape)}

    return Transform(init_fn, lambda raw: raw["w"], shape, size(shape))
