"""A folded net: a static chain of steps with their parameters, and the fold of one layer.

DiracNets sec. 1/2: Dirac parameterization and BN fold into the filters, so the
net becomes a chain of conv-ReLU pairs. At inference a parameterized kernel
(`diag(a) I + diag(b) W_norm`, DiracNets eq. 5) is a fixed tensor, and BatchNorm
with running statistics is a per-channel affine map, so each `conv -> BN` pair
is one convolution with a bias:

    s = scale / sqrt(var + eps),  kernel' = kernel * s,  bias' = bias - mean * s

(`s` broadcast over the output axis).

This room holds what a folded net is (`FoldedStep`, `FoldedNet`, the step
`KINDS`) and the per-layer folds a model builds its chain from: `fold_conv_bn`,
`fold_batch_norm`, `effective_kernel` and `split_identity`. Each model that
folds into a chain says how (`DiracNet.fold_chain`, `MobileNet.fold_chain`);
`dirac_jax.fold` asks it and runs the chain (`fold.apply_folded`). It imports
no model, so the models can import it.
"""

from __future__ import annotations

from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp

__all__ = [
    "BLOCK_CONV_ARGS",
    "KINDS",
    "FoldedNet",
    "FoldedStep",
    "effective_kernel",
    "fold_batch_norm",
    "fold_conv_bn",
    "split_identity",
]

KINDS = ("conv", "dirac_conv", "relu", "ncrelu", "max_pool", "avg_pool", "dense")

# Conv args `(strides, padding)` of every folded 3x3 block conv: stride 1, SAME.
BLOCK_CONV_ARGS = ((1, 1), ((1, 1), (1, 1)))

# PyTorch's and Flax's BatchNorm epsilon; the models pass their own `BN_EPSILON`.
_EPSILON = 1e-5


class FoldedStep(NamedTuple):
    """One static step of a folded net.

    kind: one of `KINDS`. args: for `"conv"`, `(strides, padding)` with
    `strides = (sh, sw)` and `padding = ((top, bottom), (left, right))`, or
    `(strides, padding, groups)` for a grouped (depthwise) conv; for
    `"dirac_conv"` (`fold(..., identity_apart=True)`), `(strides, padding,
    sources)` with `sources` the `param.Identity.sources` rows as a tuple of
    tuples; for `"max_pool"`, `(window, stride, pad)` (padding with `-inf`);
    otherwise `()`. `"avg_pool"` is a global mean over H and W.
    """

    kind: str
    args: tuple = ()


@flax.struct.dataclass
class FoldedNet:
    """A DiracNet or MobileNet folded into a chain of convs with bias, activations and pools.

    Attributes:
      params: one dict per step: `{"kernel", "bias"}` for `"conv"` (HWIO kernel)
        and `"dense"` (`(in, out)` kernel), `{"kernel", "scale", "bias"}` for
        `"dirac_conv"` (the kernel without its identity, and the identity's
        per-output-channel scale), `{}` for the other kinds. A pytree.
      steps: the static `FoldedStep`s (not a pytree node, so `jit` treats them as
        constants).
    """

    params: tuple[dict, ...]
    steps: tuple[FoldedStep, ...] = flax.struct.field(pytree_node=False)


def fold_conv_bn(
    kernel: jax.Array,
    *,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None = None,
    bn_bias: jax.Array | None = None,
    conv_bias: jax.Array | None = None,
    epsilon: float = _EPSILON,
) -> dict[str, jax.Array]:
    """Folds one `conv -> BatchNorm` (running statistics) into one conv with bias.

    The fold of a single layer, for any architecture: with the effective kernel
    of a `ParamConv` (`transform.apply(raw)`, or `NNXParamConv.kernel()`),
    `conv(x, kernel') + bias'` equals `BN(conv(x, kernel) + conv_bias)` at
    inference:

        s = scale / sqrt(var + epsilon),  kernel' = kernel * s,
        bias' = bn_bias + (conv_bias - mean) * s

    Args:
      kernel: `(*window, in, out)` conv kernel (Flax layout; `s` scales the
        last axis).
      mean, var: the BN running statistics, shape `(out,)`.
      scale, bn_bias: the BN affine parameters (`None`: 1 and 0, as a BN with
        `use_scale=False` / `use_bias=False`).
      conv_bias: the conv's bias, if it has one.
      epsilon: the BN's epsilon (PyTorch's and Flax's default, `1e-5`, is the
        models' `BN_EPSILON`).

    Returns:
      `{"kernel", "bias"}` in the kernel's dtype.

    Raises:
      ValueError: a statistic's shape is not `(out,)`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dirac_jax import param
      >>> from dirac_jax.folded import fold_conv_bn
      >>> from dirac_jax.layers import conv
      >>> t = param.dirac((3, 3, 4, 4))
      >>> kernel = t.apply(t.init(jax.random.key(0)))
      >>> mean, var = jnp.arange(4.0), jnp.full(4, 2.0)
      >>> folded = fold_conv_bn(kernel, mean=mean, var=var)
      >>> x = jax.random.normal(jax.random.key(1), (1, 6, 6, 4))
      >>> bn = (conv(x, kernel) - mean) / jnp.sqrt(var + 1e-5)
      >>> bool(jnp.allclose(conv(x, folded["kernel"]) + folded["bias"], bn, atol=1e-5))
      True
    """
    dtype = kernel.dtype
    out = kernel.shape[-1]
    given = {"mean": mean, "var": var, "scale": scale, "bn_bias": bn_bias, "conv_bias": conv_bias}
    bad = {k: tuple(v.shape) for k, v in given.items() if v is not None and v.shape != (out,)}
    if bad:
        raise ValueError(
            f"fold_conv_bn: the kernel has {out} output channels but {bad} are not ({out},); "
            "pass the statistics of the BatchNorm that follows this conv."
        )
    mean, var = jnp.asarray(mean, dtype), jnp.asarray(var, dtype)
    root = jnp.sqrt(var + epsilon)
    s = 1 / root if scale is None else jnp.asarray(scale, dtype) / root
    shift = -mean if conv_bias is None else jnp.asarray(conv_bias, dtype) - mean
    bias = shift * s if bn_bias is None else jnp.asarray(bn_bias, dtype) + shift * s
    # s broadcasts over the last (output) axis of the kernel.
    return {"kernel": kernel * s, "bias": bias}


def fold_batch_norm(kernel, bn_params, bn_stats, *, dtype, epsilon: float = _EPSILON) -> dict:
    """`conv -> BN` of a Flax model's layer as one `{"kernel", "bias"}` in `dtype`.

    `bn_params` is the BatchNorm's `{"scale", "bias"}`, `bn_stats` its
    `{"mean", "var"}` (`fold_conv_bn`).
    """
    return fold_conv_bn(
        kernel.astype(dtype),
        mean=bn_stats["mean"],
        var=bn_stats["var"],
        scale=bn_params["scale"],
        bn_bias=bn_params["bias"],
        epsilon=epsilon,
    )


def _checked_raw(transform, raw, shape, *, what, where, dtype):
    """`raw` in `dtype`, after checking it has the parameters `transform.init` makes."""
    expected = jax.eval_shape(transform.init, jax.random.key(0))
    got = {k: tuple(v.shape) for k, v in raw.items()}
    if got != {k: tuple(v.shape) for k, v in expected.items()}:
        raise ValueError(
            f"fold: the conv at {where} has parameters {got} but its {what} kernel of shape "
            f"{tuple(shape)} needs {sorted(expected)}; pass the variables that "
            "belong to this model (same variant, width and symmetry)."
        )
    return {k: v.astype(dtype) for k, v in raw.items()}


def effective_kernel(factory, raw, shape, *, what: str, where: str, dtype) -> jax.Array:
    """The kernel `factory(shape).apply(raw)` in `dtype`, computed by the model's own transform.

    Args:
      factory: a kernel factory (`layers.KernelFactory`), as the model's conv has.
      raw: the conv's raw parameters (e.g. `{"w", "a", "b"}`).
      shape: the kernel shape.
      what: the factory's name, for the error message.
      where: the conv's place in the model, for the error message.
      dtype: the dtype of the computation and of the kernel.

    Raises:
      ValueError: `raw` is not the parameter set of `factory(shape)`.
    """
    transform = factory(tuple(shape))
    raw = _checked_raw(transform, raw, shape, what=what, where=where, dtype=dtype)
    return transform.apply(raw).astype(dtype)


def split_identity(
    factory, raw, shape, bn_params, bn_stats, *, what: str, where: str, dtype, epsilon: float
) -> tuple[dict, tuple]:
    """A `"dirac_conv"` step's `(params, sources)`: a kernel's identity and rest, BN folded.

    `factory(shape)` must have an identity part (`param.Identity`): the rest of
    the kernel is folded with the BN (`fold_batch_norm`), and the identity's
    per-output-channel scale is multiplied by the BN scale `s`.

    Raises:
      ValueError: `raw` is not the parameter set of `factory(shape)`.
    """
    transform = factory(tuple(shape))
    raw = _checked_raw(transform, raw, shape, what=what, where=where, dtype=dtype)
    identity = transform.identity
    folded = fold_batch_norm(
        identity.rest(raw).astype(dtype), bn_params, bn_stats, dtype=dtype, epsilon=epsilon
    )
    s = jnp.asarray(bn_params["scale"], dtype) / jnp.sqrt(
        jnp.asarray(bn_stats["var"], dtype) + epsilon
    )
    scale = jnp.broadcast_to(jnp.asarray(identity.scale(raw), dtype), s.shape) * s
    sources = tuple(tuple(int(i) for i in row) for row in identity.sources)
    return {"kernel": folded["kernel"], "scale": scale, "bias": folded["bias"]}, sources
