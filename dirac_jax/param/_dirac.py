"""Dirac parameterization: DiracNets v2 eqs. 2 and 5, v1 eqs. 4-11, v2 sec. 3.4.

"DiracNets eq. N" is the final (v2) version of arXiv:1706.00388, "DiracNets v1
eq. N" its first version. Where the papers' prose and the authors' reference
training code differ, the defaults follow the code (it produced the published
tables) and the prose's choice stays available as an argument.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dirac_jax.param._core import Array, Identity, Transform, check_kernel_shape, fan_in, size

_MODES = ("truncate", "repeat")
_W_INITS = ("he_normal", "unit_normal")


def _w_std(w_init: str | float, shape: tuple[int, ...], what: str) -> float:
    """The standard deviation of the raw `w` for a `w_init` choice (see `dirac`)."""
    if isinstance(w_init, str):
        if w_init == "he_normal":
            return (2.0 / fan_in(shape)) ** 0.5
        if w_init == "unit_normal":
            return 1.0
        raise ValueError(
            f"{what}: unknown w_init {w_init!r}; expected one of {_W_INITS} or a std > 0."
        )
    if not (isinstance(w_init, int | float) and w_init > 0):
        raise ValueError(f"{what}: w_init as a std must be a number > 0, got {w_init!r}.")
    return float(w_init)


def _check_delta(shape: tuple[int, ...], mode: str, groups: int) -> None:
    """Raises if the delta of `mode` cannot serve `shape` (see `dirac_delta`)."""
    *_, n_in, n_out = shape
    if mode == "truncate":
        if groups < 1 or n_out % groups:
            raise ValueError(
                f"dirac_delta: kernel_shape {shape} has out_features={n_out}, which must be "
                f"divisible by groups={groups} in mode='truncate'."
            )
    elif mode == "repeat":
        if groups != 1:
            raise ValueError(
                f"dirac_delta: mode='repeat' supports groups=1 only, got groups={groups}."
            )
        if n_in % n_out and n_out % n_in:
            raise ValueError(
                f"dirac_delta: kernel_shape {shape} has in={n_in}, out={n_out}; mode='repeat' "
                "needs in = m*out or out = m*in for a natural m (DiracNets v1 sec. 2.1). "
                "Use mode='truncate' for other shapes."
            )
    else:
        raise ValueError(f"dirac_delta: unknown mode {mode!r}; expected one of {_MODES}.")


def _channel_rule(i, o, n_in: int, n_out: int, mode: str, groups: int, rem):
    """Whether input channel `i` feeds output channel `o` at the delta's centre tap.

    The one statement of the rule, for traced iotas (`_channel_delta`) and for host
    index arrays (`_delta_sources`) alike; `rem` is the namespace's remainder.
    """
    if mode == "truncate":
        # torch.nn.init.dirac_: output d of group g reads input d, for d < min(out/groups, in).
        return i == (o if groups == 1 else rem(o, n_out // groups))
    # A square delta of side min(in, out), tiled along the longer channel axis.
    n = min(n_in, n_out)
    return (i if n_in == n else rem(i, n)) == (o if n_out == n else rem(o, n))


def _channel_delta(n_in: int, n_out: int, mode: str, groups: int) -> Array:
    """The `(in, out)` boolean matrix of the delta's centre tap (see `dirac_delta`).

    Built from iotas, not from a host array: under `jit` the delta is then a few
    ops that XLA fuses into the kernel computation, instead of a literal the size
    of the kernel in every compiled program.
    """
    i = jax.lax.broadcasted_iota(jnp.int32, (n_in, n_out), 0)
    o = jax.lax.broadcasted_iota(jnp.int32, (n_in, n_out), 1)

    def rem(x, n):  # An int32 divisor, so the op is well typed with jax_enable_x64 too.
        return jax.lax.rem(x, jnp.asarray(n, jnp.int32))

    return _channel_rule(i, o, n_in, n_out, mode, groups, rem)


def _at_centre(centre: Array, spatial: Sequence[int]) -> Array:
    """A kernel of `spatial` taps that is `centre` (`(in, out)`) at the centre tap, else 0."""
    x = centre.reshape((1,) * len(spatial) + centre.shape)
    pads = [(k // 2, k - 1 - k // 2, 0) for k in spatial] + [(0, 0, 0)] * 2
    return jax.lax.pad(x, jnp.zeros((), x.dtype), pads)


def _delta(shape: tuple[int, ...], mode: str, groups: int, dtype) -> Array:
    *spatial, n_in, n_out = shape
    return _at_centre(_channel_delta(n_in, n_out, mode, groups).astype(dtype), spatial)


def _delta_sources(shape: tuple[int, ...], mode: str, groups: int) -> np.ndarray:
    """`Identity.sources` of the delta `dirac_delta(shape, mode=mode, groups=groups)`.

    Static facts of the factory, so computed on the host (a factory may run under
    a trace), from the same `_channel_rule` as the traced delta.
    """
    *spatial, n_in, n_out = shape
    i, o = np.indices((n_in, n_out))
    centre = _channel_rule(i, o, n_in, n_out, mode, groups, np.remainder).T  # (out, in)
    m = max(1, int(centre.sum(axis=1).max()))
    sources = np.full((n_out, m), -1, np.int32)
    for j, row in enumerate(centre):
        hits = np.flatnonzero(row)
        sources[j, : len(hits)] = hits
    return sources


def dirac_delta(
    kernel_shape: Sequence[int],
    *,
    mode: str = "truncate",
    groups: int = 1,
    dtype: jnp.dtype = jnp.float32,
) -> Array:
    """The identity of the convolution algebra, DiracNets eq. 2 (v1 eq. 2).

    A SAME-padded stride-1 convolution with this kernel returns its input when
    `in == out` and every spatial size is odd: the single 1 of each filter sits at
    the centre `K // 2` of every spatial axis.

    Args:
      kernel_shape: Flax layout `(*spatial, in_features, out_features)`, with 1 to
        3 spatial axes. For grouped convolutions `in_features` is per group, as
        in Flax's `feature_group_count`.
      mode: how a non-square channel shape is served.
        `"truncate"` follows `torch.nn.init.dirac_(tensor, groups)`: in each of
        the `groups` output groups, output channel `d` of the group reads input
        channel `d` for `d < min(out / groups, in)`; the other filters are zero.
        `"repeat"` is DiracNets v1 sec. 2.1: when `in = m * out` the square delta
        is stacked `m` times along the input axis (the conv sums `m` input
        blocks, v1 eq. 7); when `out = m * in` it is stacked along the output
        axis (the output is the input tiled `m` times, v1 eq. 8).
      groups: number of output groups (truncate mode only).
      dtype: dtype of the result.

    Returns:
      An array of shape `kernel_shape`, zero except for ones at the centres. It
      is computed with JAX ops (no host array), so under `jit` it is part of
      the computation rather than a constant of the compiled program.

    Raises:
      ValueError: if the shape is not a kernel shape, `mode` is unknown, `out` is
        not divisible by `groups`, or (repeat mode) neither channel count divides
        the other.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dirac_jax.param import dirac_delta
      >>> d = dirac_delta((3, 3, 2, 2))
      >>> d[1, 1].tolist()
      [[1.0, 0.0], [0.0, 1.0]]
      >>> float(d.sum())
      2.0
      >>> dirac_delta((1, 4, 2), mode="repeat")[0].tolist()
      [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    """
    shape = check_kernel_shape(kernel_shape, "dirac_delta")
    _check_delta(shape, mode, groups)
    return _delta(shape, mode, groups, dtype)


def _per_filter(scale: Array, shape: tuple[int, ...]) -> Array:
    """`scale` (`(out,)` or a scalar) broadcast along the last (output) axis of `shape`."""
    return jax.lax.broadcast_in_dim(scale, shape, tuple(range(len(shape) - scale.ndim, len(shape))))


def normalize(w: Array, eps: float = 1e-12) -> Array:
    """Scales each output filter to unit L2 norm: `v / max(||v||, eps)`, DiracNets v1 eq. 5.

    A filter is everything but the last (output) axis, so the norm runs over the
    spatial and input axes. The norm is accumulated in at least float32, so
    bfloat16 weights keep their dtype without losing the norm's precision.

    Args:
      w: a kernel `(*spatial, in, out)`, or any array whose last axis indexes
        filters.
      eps: lower bound of the norm, so all-zero filters stay zero.

    Returns:
      An array like `w` whose filters have norm 1 (or are zero). The gradient is
      finite everywhere: a filter with norm at most `eps`, all-zero ones
      included, gets that of `v / eps`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dirac_jax.param import normalize
      >>> normalize(jnp.array([[3.0, 0.0], [4.0, 0.0]])).tolist()
      [[0.6000000238418579, 0.0], [0.800000011920929, 0.0]]
    """
    v = w.astype(jnp.promote_types(w.dtype, jnp.float32))
    ss = jnp.sum(jnp.square(v), axis=tuple(range(w.ndim - 1)), keepdims=True)
    # The square root of 1, not of 0, for all-zero filters: the gradient of `sqrt` at 0
    # is infinite and times 0 it is NaN, even through the unselected branch. A filter at
    # the floor then gets the finite derivative of `v / eps`. Nonzero filters keep
    # `sqrt(ss)` exactly. `select`, not `maximum`: maximum's gradient splits ties.
    nonzero = ss > 0
    norm = jnp.sqrt(jax.lax.select(nonzero, ss, jnp.ones_like(ss)))
    floor = jnp.full_like(norm, eps)
    return (v / jax.lax.select(nonzero & (norm > floor), norm, floor)).astype(w.dtype)


def _inverse_norm(w: Array, eps: float) -> tuple[Array, Array]:
    """`(1 / max(||w||, eps), ||w|| > eps)` per output filter, each of shape `(out,)`.

    Computed as `rsqrt(max(||w||^2, eps^2))` from one reduction.
    """
    ss = jnp.sum(jnp.square(w), axis=tuple(range(w.ndim - 1)))
    floor = jnp.full_like(ss, eps * eps)
    return jax.lax.rsqrt(jax.lax.max(ss, floor)), ss > floor


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _scaled_unit(b: Array, w: Array, eps: float) -> Array:
    """`diag(b) normalize(w)`, DiracNets eq. 5 without the identity; `b` `(out,)` or scalar.

    Computed as `w * (b / max(||w||, eps))`, with a hand-written derivative: for
    `n = ||w||` per filter, `d(b w / n) = (db / n - b (w . dw) / n^3) w + (b / n) dw`,
    with `w . dw` the per-filter inner product (and no term through a norm
    floored at `eps`). Written so, the backward pass reduces `sum(g * w)` once
    per filter, for the gradient of `b` and for the norm's part of the gradient
    of `w` alike, and every per-filter factor derives from one `rsqrt`. Autodiff
    of `normalize` computes more small pieces, each its own XLA fusion, and each
    fusion is compiled once per Dirac layer of every train step (see
    `python -m benchmarks compile`). Values and gradients equal
    `b * normalize(w)` and its autodiff to float rounding (`tests/test_param.py`).
    """
    inv, _ = _inverse_norm(w, eps)
    return w * _per_filter(b * inv, w.shape)


@_scaled_unit.defjvp
def _scaled_unit_jvp(eps, primals, tangents):
    b, w = primals
    db, dw = tangents
    inv, free = _inverse_norm(w, eps)
    scale = b * inv
    coef = jnp.where(free, scale * inv * inv, jnp.zeros_like(inv))
    dot = jnp.sum(w * dw, axis=tuple(range(w.ndim - 1)))
    along_w = db * inv - coef * dot
    scale = _per_filter(scale, w.shape)
    return w * scale, w * _per_filter(along_w, w.shape) + dw * scale


def _identity(a: Array, shape: tuple[int, ...], mode: str, groups: int) -> Array:
    """`diag(a) delta`: `a[o]` where the delta of `shape` is 1, else 0.

    Built without the full-size product `a * delta`, so that the gradient of
    `a` is not a reduction over the whole kernel. With per-channel `a` and the
    default delta (truncate, one group), the ones sit at flat positions
    `c + d * (out + 1)` for the centre tap's offset `c` and `d < min(in, out)`:
    one `pad` of `a[:min(in, out)]` with interior padding `out` places them all,
    and the gradient of `a` is its transpose, a strided slice of the kernel
    gradient. Otherwise a `select` on the `(in, out)` centre, padded to the
    kernel. The values equal `a * delta` up to the sign of zeros.
    """
    *spatial, n_in, n_out = shape
    if a.ndim == 1 and mode == "truncate" and groups == 1:
        m = min(n_in, n_out)
        offset = int(np.ravel_multi_index([k // 2 for k in spatial], spatial)) * n_in * n_out
        length = m + (m - 1) * n_out
        high = size(shape) - offset - length
        flat = jax.lax.pad(a[:m], jnp.zeros((), a.dtype), [(offset, high, n_out)])
        return flat.reshape(shape)
    centre = _channel_delta(n_in, n_out, mode, groups)
    a = _per_filter(a, (n_in, n_out))
    return _at_centre(jnp.where(centre, a, jnp.zeros((), a.dtype)), spatial)


def dirac(
    kernel_shape: Sequence[int],
    *,
    a_init: float = 1.0,
    b_init: float = 0.1,
    w_init: str | float = "he_normal",
    per_channel: bool = True,
    weight_norm: bool = True,
    mode: str = "truncate",
    groups: int = 1,
) -> Transform:
    """Dirac parameterization `W_hat = diag(a) I + diag(b) W_norm`, DiracNets eq. 5.

    `init(key)` returns `{"w", "a", "b"}`: `w` of `kernel_shape` drawn as
    `w_init` says, and `a`, `b` filled with `a_init`, `b_init`. `apply(raw)`
    returns the kernel.

    The scale of the raw `w` matters although `w` is normalized: the gradient
    of `w / ||w||` scales as `1 / ||w||`, so one SGD step turns the filter's
    direction by about `lr / ||w||^2`, and weight decay acts on the raw `w`. The
    default is therefore the reference code's He-normal draw
    (`std = sqrt(2 / fan_in)`, filter norm about `sqrt(2)`); the paper's prose
    says `W ~ N(0, 1)` (`w_init="unit_normal"`), whose filters have norm
    `sqrt(fan_in)` (24 for a 3x3x64 filter) and, at the paper's lr 0.1, turn
    hundreds of times more slowly.

    With `per_channel=False`, `a` and `b` are scalars: DiracNets v1 eq. 4,
    `W_hat = a delta + b W_norm`. With `weight_norm=False`, `W` enters as is
    (DiracNets eq. 4). `a` scales the identity per output channel, so after
    training a large `a` with a small `b` means "mostly pass the input through".

    The kernel is built inside the computation (no delta literal in compiled
    programs), and the derivative of `diag(b) W_norm` is written by hand so a
    train step compiles fewer XLA fusions per layer: it equals autodiff of the
    formula to float rounding, in reverse and forward mode and at second order.

    Args:
      kernel_shape: Flax layout `(*spatial, in, out)`, 1 to 3 spatial axes.
      a_init: initial value of `a` (the paper: 1.0; v1: 5.0).
      b_init: initial value of `b` (the paper: 0.1; v1: 1e-3).
      w_init: the draw of the raw `w`: `"he_normal"` (`N(0, 2 / fan_in)`, the
        reference v2 code, default), `"unit_normal"` (`N(0, 1)`, the v2
        paper's prose), or a number, the std of a zero-mean normal (the
        reference v1 code uses 0.1).
      per_channel: `a`, `b` of shape `(out,)` (v2) or scalars (v1).
      weight_norm: normalize each filter of `w` (v1 eq. 5) before scaling by `b`.
      mode: how the delta serves `in != out`; see `dirac_delta`.
      groups: output groups of the delta (truncate mode); see `dirac_delta`.

    Returns:
      A `Transform` whose `num_params` is `size(w) + 2 * out` (or `+ 2`).

    Raises:
      ValueError: an unknown `w_init`, or as `dirac_delta`, for shapes the delta
        mode cannot serve.

    Examples:
      >>> import jax
      >>> from dirac_jax.param import dirac
      >>> t = dirac((3, 3, 16, 16))
      >>> raw = t.init(jax.random.key(0))
      >>> sorted(raw), raw["a"].shape, t.num_params
      (['a', 'b', 'w'], (16,), 2336)
      >>> t.apply(raw).shape
      (3, 3, 16, 16)
    """
    shape = check_kernel_shape(kernel_shape, "dirac")
    std = _w_std(w_init, shape, "dirac")
    _check_delta(shape, mode, groups)
    scale_shape = (shape[-1],) if per_channel else ()

    def init(key):
        return {
            "w": std * jax.random.normal(key, shape, jnp.float32),
            "a": jnp.full(scale_shape, a_init, jnp.float32),
            "b": jnp.full(scale_shape, b_init, jnp.float32),
        }

    def rest(raw):
        w, b = raw["w"], raw["b"]
        dtype = jnp.result_type(w, raw["a"], b)
        if not weight_norm:
            # b broadcasts over the last (output) axis: diag(b).
            return _per_filter(b.astype(dtype), shape) * w.astype(dtype)
        # The norm in at least float32, as `normalize`.
        compute = jnp.promote_types(dtype, jnp.float32)
        return _scaled_unit(b.astype(compute), w.astype(compute), 1e-12).astype(dtype)

    def apply(raw):
        scaled = rest(raw)
        dtype = scaled.dtype
        # The delta is built here, not in the factory, so it is traced into the
        # computation (`_channel_delta`) instead of being a literal of the program.
        return (_identity(raw["a"].astype(dtype), shape, mode, groups) + scaled).astype(dtype)

    identity = Identity(lambda raw: raw["a"], rest, _delta_sources(shape, mode, groups))
    return Transform(init, apply, shape, size(shape) + 2 * size(scale_shape), identity)


def dirac_v1(kernel_shape: Sequence[int], *, w_init: str | float = 0.1) -> Transform:
    """DiracNets v1: scalar `a = 5`, `b = 1e-3`, repeated deltas (v1 eqs. 4, 7-8).

    The raw `w` is drawn `N(0, 0.1^2)` as in the reference v1 code (`w_init`:
    see `dirac`).

    Use it after `ncrelu`, which doubles the channels: with `in = 2 * out` and
    `W = 0` the layer computes `a * relu(x) - a * relu(-x) = a * x` (v1 eq. 11).

    Examples:
      >>> from dirac_jax.param import dirac_v1
      >>> dirac_v1((3, 3, 32, 16)).num_params
      4610
    """
    return dirac(
        kernel_shape, a_init=5.0, b_init=1e-3, w_init=w_init, per_channel=False, mode="repeat"
    )


def dirac_residual(
    kernel_shape: Sequence[int], sigma: float, *, mode: str = "truncate"
) -> Transform:
    """Dirac parameterization as ResNet initialization, `W_hat = I + W`, DiracNets sec. 3.4.

    `init(key)` returns `{"w"}` with `W ~ N(0, sigma^2)`, ignoring the filter
    shape as the paper does; `apply(raw) = delta + w`.

    Raises:
      ValueError: if `sigma` is negative, or as `dirac_delta`.

    Examples:
      >>> import jax
      >>> from dirac_jax.param import dirac_residual
      >>> t = dirac_residual((3, 3, 4, 4), sigma=0.0)
      >>> float(t.apply(t.init(jax.random.key(0)))[1, 1, 2, 2])
      1.0
    """
    shape = check_kernel_shape(kernel_shape, "dirac_residual")
    if not sigma >= 0:
        raise ValueError(f"dirac_residual: sigma must be >= 0, got {sigma!r}.")
    _check_delta(shape, mode, 1)

    def init(key):
        return {"w": sigma * jax.random.normal(key, shape, jnp.float32)}

    def apply(raw):
        return _delta(shape, mode, 1, raw["w"].dtype) + raw["w"]

    identity = Identity(
        lambda raw: jnp.ones((), raw["w"].dtype),
        lambda raw: raw["w"],
        _delta_sources(shape, mode, 1),
    )
    return Transform(init, apply, shape, size(shape), identity)


def ncrelu(x: Array, axis: int = -1) -> Array:
    """Negative CReLU, `[relu(x), -relu(-x)]` along `axis`, DiracNets v1 eq. 9.

    It doubles the channels and loses no information: the two halves sum to `x`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from dirac_jax.param import ncrelu
      >>> ncrelu(jnp.array([-2.0, 3.0])).tolist()
      [0.0, 3.0, -2.0, 0.0]
    """
    return jnp.concatenate([jnp.maximum(x, 0), jnp.minimum(x, 0)], axis=axis)
