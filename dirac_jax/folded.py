"""A folded net: a static chain of steps with their parameters, and the fold of one layer.

DiracNets sec. 1/2: Dirac parameterization and BN fold into the filters, so the
net becomes a chain of conv-ReLU pairs. At inference a parameterized kernel
(`diag(a) I + diag(b) W_norm`, DiracNets eq. 5) is a fixed tensor, and BatchNorm
with running statistics is a per-channel affine map, so each `conv -> BN` pair
is one convolution with a bias:

    s = scale / sqrt(var + eps),  kernel' = kernel * s,  bias' = bias - mean * s

(`s` broadcast over the output axis).

This room holds what a folded net is (`FoldedStep`, `FoldedNet`, the step
`KINDS`), the per-layer folds (`fold_conv_bn`, `fold_batch_norm`,
`effective_kernel`, `split_identity`), the one chain builder a model folds
itself with (`ChainBuilder`), and the contract a model that folds satisfies
(`ChainFoldable`, `KernelFoldable`): `dirac_jax.fold` asks for nothing else,
so a new model folds by satisfying one of them. It imports no model, so the
models can import it; the BatchNorm epsilon every model uses lives here
(`BN_EPSILON`) for that reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import flax
import jax
import jax.numpy as jnp

__all__ = [
    "BLOCK_CONV_ARGS",
    "BN_EPSILON",
    "KINDS",
    "ChainBuilder",
    "ChainFoldable",
    "FoldedNet",
    "FoldedStep",
    "KernelFoldable",
    "effective_kernel",
    "fold_batch_norm",
    "fold_conv_bn",
    "split_identity",
]

#: The step kinds a `FoldedStep` may have, and so the ops a folded chain is built from.
KINDS = ("conv", "dirac_conv", "relu", "ncrelu", "max_pool", "avg_pool", "dense")

# Conv args `(strides, padding)` of every folded 3x3 block conv: stride 1, SAME.
#: The `(strides, padding)` of every folded 3x3 block conv, stride 1 and SAME padding.
BLOCK_CONV_ARGS = ((1, 1), ((1, 1), (1, 1)))

# The BatchNorm epsilon of every model here, and so of every fold: PyTorch's and Flax's
# default, which the reference checkpoints were trained with.
#: The BatchNorm epsilon of every model and of every fold (PyTorch's and Flax's default).
BN_EPSILON = 1e-5


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
    epsilon: float = BN_EPSILON,
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
      epsilon: the BN's epsilon (default `BN_EPSILON`, PyTorch's and Flax's
        `1e-5`, which every model here uses).

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


def fold_batch_norm(kernel, bn_params, bn_stats, *, dtype, epsilon: float = BN_EPSILON) -> dict:
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


def _at(tree: Mapping, path: Sequence[str]):
    for name in path:
        tree = tree[name]
    return tree


class ChainBuilder:
    """Builds a `FoldedNet` step by step from a Flax model's `params` and `batch_stats`.

    A model's `fold_chain` walks its own layers in order and calls `conv_bn`
    for each `conv -> BN` pair, `dense` for the classifier and `add` for the
    other steps; `build` returns the chain. Layers are named by their module
    paths, e.g. `("group0", "block1", "conv")`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from dirac_jax.folded import ChainBuilder
      >>> from dirac_jax import param
      >>> params = {"conv": {"w": jnp.ones((1, 1, 2, 3))},
      ...           "bn": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}
      >>> stats = {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}
      >>> chain = ChainBuilder(params, stats, dtype=jnp.float32)
      >>> args = ((1, 1), ((0, 0), (0, 0)))
      >>> chain.conv_bn(param.plain, ("conv",), ("bn",), (1, 1, 2, 3), args, what="plain")
      >>> chain.add("relu")
      >>> [s.kind for s in chain.build().steps]
      ['conv', 'relu']
    """

    def __init__(
        self, params: Mapping, batch_stats: Mapping, *, dtype, epsilon: float = BN_EPSILON
    ):
        self.params, self.batch_stats = params, batch_stats
        self.dtype, self.epsilon = dtype, epsilon
        self._steps: list[FoldedStep] = []
        self._params: list[dict] = []

    def add(self, kind: str, args: tuple = (), params: dict | None = None) -> None:
        """Appends one step (`KINDS`) with its parameters (none for an activation or a pool)."""
        self._steps.append(FoldedStep(kind, args))
        self._params.append({} if params is None else params)

    def conv_bn(
        self,
        factory: Callable,
        conv: Sequence[str],
        bn: Sequence[str],
        shape: Sequence[int],
        args: tuple,
        *,
        what: str,
        identity_apart: bool = False,
    ) -> None:
        """Appends the conv at path `conv` with the BN at path `bn` folded into it.

        Args:
          factory: the conv's kernel factory, the model's own, so the folded
            kernel comes from the transform the model runs.
          conv, bn: module paths of the conv (its raw kernel parameters) and of
            the BatchNorm that follows it.
          shape: the kernel shape.
          args: the `"conv"` step's args (`FoldedStep`).
          what: the factory's name, for error messages.
          identity_apart: a kernel with an identity part (`param.Identity`)
            becomes a `"dirac_conv"` step (`split_identity`), args `(*args,
            sources)`; other kernels are one `"conv"` either way.

        Raises:
          KeyError: a path is not in `params` or `batch_stats`.
          ValueError: the raw parameters are not those of `factory(shape)`.
        """
        raw = _at(self.params, conv)
        bn_params, bn_stats = _at(self.params, bn), _at(self.batch_stats, bn)
        where = ".".join(conv)
        if identity_apart and factory(tuple(shape)).identity is not None:
            p, sources = split_identity(
                factory, raw, shape, bn_params, bn_stats,
                what=what, where=where, dtype=self.dtype, epsilon=self.epsilon,
            )  # fmt: skip
            self.add("dirac_conv", (*args, sources), p)
            return
        kernel = effective_kernel(factory, raw, shape, what=what, where=where, dtype=self.dtype)
        folded = fold_batch_norm(
            kernel, bn_params, bn_stats, dtype=self.dtype, epsilon=self.epsilon
        )
        self.add("conv", args, folded)

    def dense(self, path: Sequence[str]) -> None:
        """Appends the classifier at `path` (`{"kernel", "bias"}`) as a `"dense"` step."""
        fc = _at(self.params, path)
        self.add("dense", (), {k: fc[k].astype(self.dtype) for k in ("kernel", "bias")})

    def build(self) -> FoldedNet:
        """The chain so far."""
        return FoldedNet(params=tuple(self._params), steps=tuple(self._steps))


@runtime_checkable
class ChainFoldable(Protocol):
    """A model with no shortcut, which folds whole into a chain (`dirac_jax.fold.fold`).

    DiracNet and MobileNet satisfy it; so does any Flax module that declares
    `folds = "chain"` and builds its own chain, usually with `ChainBuilder`.
    `fold.fold` checks the variables, then calls `fold_chain`.
    """

    folds: ClassVar[str]  # "chain"

    def fold_chain(
        self, params: Mapping, batch_stats: Mapping, *, dtype: Any, identity_apart: bool = False
    ) -> FoldedNet:
        """This net as a `FoldedNet` computing its eval function (BN with running statistics).

        Raises:
          KeyError: a layer is missing from `params` or `batch_stats`.
          ValueError: parameters that do not belong to this model.
        """
        ...


@runtime_checkable
class KernelFoldable(Protocol):
    """A residual model, whose kernels fold but whose shortcuts stay (`fold.fold_kernels`).

    WideResNet and ResNet satisfy it: `plain_twin()` is the same architecture
    with plain (`param.plain`) kernels, and `kernel_factory_of(path)` the kernel
    factory of the conv at a module path of this model, so each kernel is
    computed once by the model's own transform and stored in the twin.
    """

    folds: ClassVar[str]  # "kernels"

    def plain_twin(self) -> Any:
        """The same net with every conv a plain kernel `{"w": kernel}`."""
        ...

    def kernel_factory_of(self, path: tuple[str, ...]) -> Callable:
        """The kernel factory of the conv at module `path`, e.g. `("group0_block0", "conv1")`."""
        ...
