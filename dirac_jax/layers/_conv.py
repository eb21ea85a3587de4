"""The framework-free conv: channels-last, any spatial rank, kernel from a `param` transform."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dirac_jax import param

# lax dimension numbers per number of spatial axes: channels last, Flax kernel layout.
_LAYOUTS = {
    1: ("NWC", "WIO", "NWC"),
    2: ("NHWC", "HWIO", "NHWC"),
    3: ("NDHWC", "DHWIO", "NDHWC"),
}


def spatial_tuple(value, n: int, what: str) -> tuple[int, ...]:
    """`value` as `n` positive ints: an int is repeated, a sequence must have `n` entries."""
    values = (value,) * n if isinstance(value, int | np.integer) else tuple(value)
    if len(values) != n or not all(isinstance(v, int | np.integer) and v >= 1 for v in values):
        raise ValueError(
            f"{what} must be a positive int or {n} positive ints (one per spatial axis), "
            f"got {value!r}."
        )
    return tuple(int(v) for v in values)


def _pads(padding, spatial_in, kernel_spatial, strides, dilation) -> tuple[tuple[int, int], ...]:
    """Explicit `(low, high)` pads per spatial axis, as `lax.conv_general_dilated` resolves them."""
    n = len(spatial_in)
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(
                f"padding {padding!r} is not supported; use 'SAME', 'VALID', an int, or "
                f"{n} (low, high) pairs."
            )
        effective = [(k - 1) * d + 1 for k, d in zip(kernel_spatial, dilation, strict=True)]
        return tuple(jax.lax.padtype_to_pads(spatial_in, effective, strides, padding.upper()))
    if isinstance(padding, int | np.integer):
        return ((int(padding), int(padding)),) * n
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    if len(pads) != n or any(len(p) != 2 for p in pads):
        raise ValueError(f"padding must hold {n} (low, high) pairs, got {padding!r}.")
    return pads


def conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: int | Sequence[int] = 1,
    padding: Any = "SAME",
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    precision=None,
) -> jax.Array:
    """A channels-last convolution with a Flax-layout kernel, in 1-D, 2-D or 3-D.

    Args:
      x: `(batch, *spatial, in_features)`.
      kernel: `(*window, in_features // groups, out_features)`.
      strides: an int or one per spatial axis.
      padding: `"SAME"`, `"VALID"`, an int, or one `(low, high)` pair per axis.
      dilation: kernel dilation, an int or one per spatial axis.
      groups: feature groups (`feature_group_count`): `in_features` and
        `out_features` must both be divisible by it.
      precision: passed to `jax.lax.conv_general_dilated`.

    Returns:
      `(batch, *spatial_out, out_features)` in the promoted dtype of `x` and `kernel`.

    Raises:
      ValueError: the ranks or channel counts of `x` and `kernel` disagree, or a
        stride, dilation or padding is malformed.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dirac_jax.layers import conv
      >>> conv(jnp.ones((2, 10, 4)), jnp.ones((3, 2, 6)), groups=2).shape
      (2, 10, 6)
    """
    n = _check(x, kernel, groups)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=spatial_tuple(strides, n, "strides"),
        padding=_pads(
            padding,
            x.shape[1:-1],
            kernel.shape[:-2],
            spatial_tuple(strides, n, "strides"),
            spatial_tuple(dilation, n, "dilation"),
        ),
        rhs_dilation=spatial_tuple(dilation, n, "dilation"),
        dimension_numbers=_LAYOUTS[n],
        feature_group_count=groups,
        precision=precision,
    )


def _check(x, kernel, groups: int) -> int:
    n = kernel.ndim - 2
    if n not in _LAYOUTS:
        raise ValueError(
            f"kernel shape {kernel.shape} must be (*window, in, out) with 1 to 3 spatial axes."
        )
    if x.ndim != n + 2:
        raise ValueError(
            f"input shape {x.shape} must be (batch, *spatial, features) with {n} spatial axes "
            f"for the kernel of shape {kernel.shape}; add a batch axis with x[None]."
        )
    if not (isinstance(groups, int) and groups >= 1) or x.shape[-1] % groups:
        raise ValueError(
            f"groups={groups!r} must be a positive int dividing the {x.shape[-1]} input features."
        )
    if x.shape[-1] // groups != kernel.shape[-2] or kernel.shape[-1] % groups:
        raise ValueError(
            f"kernel shape {kernel.shape} does not fit {x.shape[-1]} input features in "
            f"{groups} group(s): it needs in = {x.shape[-1] // groups} and out divisible by "
            f"{groups}."
        )
    return n


def identity_term(
    x: jax.Array,
    identity: param.Identity,
    kernel_shape: Sequence[int],
    *,
    strides: int | Sequence[int] = 1,
    padding: Any = "SAME",
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> jax.Array:
    """`conv(x, delta)` for the delta of `identity`, without a convolution.

    The delta has ones at the centre tap only, so output position `o` reads the
    input at `o * stride - pad_low + centre * dilation`: a shifted, strided
    view of `x`, whose channels are then selected (or summed, for v1's
    repeated deltas) by `identity.sources`. The result is exact in the dtype of
    `x`, which is how `param_conv` keeps the identity path of a bfloat16 layer
    exact.

    Args:
      x: `(batch, *spatial, in_features)`.
      identity: `transform.identity`.
      kernel_shape: `transform.kernel_shape`, `(*window, in // groups, out)`.
      strides, padding, dilation, groups: as in `conv`.

    Returns:
      `(batch, *spatial_out, out)`, equal to `conv(x, delta, ...)`. The scale
      `identity.scale(raw)` is not applied.
    """
    *window, in_per_group, n_out = (int(s) for s in kernel_shape)
    n = len(window)
    strides, dilation = spatial_tuple(strides, n, "strides"), spatial_tuple(dilation, n, "dilation")
    pads = _pads(padding, x.shape[1:-1], window, strides, dilation)
    # Shift so that the centre tap of output 0 lands on index 0, then stride.
    config = [(0, 0, 0)]
    for k, d, (low, high) in zip(window, dilation, pads, strict=True):
        centre = k // 2
        config.append((low - centre * d, high - (k - 1 - centre) * d, 0))
    config.append((0, 0, 0))
    shifted = jax.lax.pad(x, jnp.zeros((), x.dtype), config)
    view = shifted[(slice(None), *(slice(None, None, s) for s in strides), slice(None))]

    sources = np.asarray(identity.sources)
    per_group_out = n_out // groups
    offsets = (np.arange(n_out) // per_group_out * in_per_group)[:, None]
    channels = np.where(sources >= 0, sources + offsets, -1)
    n_in = x.shape[-1]
    if channels.shape[1] == 1 and np.array_equal(channels[:, 0], np.arange(n_out)):
        return view[..., :n_out]  # the square identity (and truncated wider inputs)
    # Column n_in of the extended input is zero: it serves the missing sources.
    extended = jnp.concatenate([view, jnp.zeros((*view.shape[:-1], 1), view.dtype)], axis=-1)
    picked = jnp.take(extended, np.where(channels >= 0, channels, n_in), axis=-1)
    return picked.sum(axis=-1) if channels.shape[1] > 1 else picked[..., 0]


def _narrower_than_f32(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def param_conv(
    x: jax.Array,
    transform: param.Transform,
    raw: Any,
    *,
    strides: int | Sequence[int] = 1,
    padding: Any = "SAME",
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    dtype=None,
    exact_identity: bool | None = None,
    precision=None,
) -> jax.Array:
    """Convolves `x` with the kernel `transform.apply(raw)`; the plain-JAX Dirac conv.

    Mixed precision: with a `dtype` narrower than float32 (bfloat16), a kernel
    with a Dirac identity part (`transform.identity`) is not cast as a whole.
    Its centre diagonal taps are `a + b * w_norm`, about `1 + 0.004`, and
    bfloat16's spacing near 1 is `2^-7`: the cast would round the `W` term at
    those taps away. Instead the layer computes `a * conv(x, delta)` exactly in
    float32 (`identity_term`: a channel selection, no multiply-adds) and adds
    the `dtype` conv of the rest, `diag(b) W_norm`, whose rounding is relative
    to its own small size. The output is then cast to `dtype`.

    Chosen by measurement (BENCHMARKS.md, "bf16": `python -m benchmarks
    bf16`, run from a checkout): the channel selection keeps more outputs
    correctly rounded than the cast at about the cast's layer time, and costs
    less than a float32 conv with the kernel `a * delta`, which gives the same
    numbers. The float32 sum reads the activations once more, which a whole
    bf16 training step feels; `exact_identity=False` restores the cast where
    speed matters more.

    Args:
      x: `(batch, *spatial, in_features)`.
      transform: a `dirac_jax.param` transform of kernel shape
        `(*window, in_features // groups, out_features)`.
      raw: its parameters (`transform.init(key)`, trained).
      strides, padding, dilation, groups, precision: as in `conv`.
      dtype: computation dtype; `None` promotes the dtypes of `x` and `raw`.
      exact_identity: add the identity part in float32 beside the conv of the
        rest. `None` (default): when `dtype` is narrower than float32 and the
        transform has an identity part. `True` forces it (same result in
        float32), `False` casts the whole kernel.

    Returns:
      `(batch, *spatial_out, out_features)` in `dtype`.

    Raises:
      ValueError: shapes that do not fit (see `conv`), or `exact_identity=True`
        for a transform without an identity part.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dirac_jax import param
      >>> from dirac_jax.layers import param_conv
      >>> t = param.dirac((3, 3, 8, 8))
      >>> raw = t.init(jax.random.key(0))
      >>> x = jax.random.normal(jax.random.key(1), (2, 16, 16, 8))
      >>> param_conv(x, t, raw, dtype=jnp.bfloat16).dtype
      dtype(bfloat16)
    """
    kernel_dtype = jnp.result_type(*jax.tree.leaves(raw))
    dtype = jnp.dtype(dtype) if dtype is not None else jnp.result_type(x, kernel_dtype)
    if exact_identity and transform.identity is None:
        raise ValueError(
            "exact_identity=True needs a transform with a Dirac identity part (param.dirac, "
            "dirac_v1, dirac_residual); this one has none."
        )
    split = transform.identity is not None and (
        exact_identity if exact_identity is not None else _narrower_than_f32(dtype)
    )
    kwargs = dict(strides=strides, padding=padding, dilation=dilation, groups=groups)
    if not split:
        kernel = transform.apply(raw).astype(dtype)
        return conv(x.astype(dtype), kernel, precision=precision, **kwargs).astype(dtype)
    ident = transform.identity
    rest = ident.rest(raw).astype(dtype)
    y = conv(x.astype(dtype), rest, precision=precision, **kwargs)
    wide = jnp.promote_types(dtype, jnp.float32)
    x_wide = x.astype(wide)
    passed = identity_term(x_wide, ident, transform.kernel_shape, **kwargs)
    scale = ident.scale(raw).astype(wide)
    return (y.astype(wide) + scale * passed).astype(dtype)
