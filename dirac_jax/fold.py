"""Folding a trained DiracNet or MobileNet into a plain chain of conv-ReLU pairs.

DiracNets sec. 1/2: Dirac parameterization and BN fold into the filters, so the
net becomes a chain of conv-ReLU pairs. At inference the Dirac kernel
`diag(a) I + diag(b) W_norm` (DiracNets eq. 5) is a fixed tensor, and BatchNorm
with running statistics is a per-channel affine map, so each `conv -> BN` pair
is one convolution with a bias:

    s = scale / sqrt(var + eps),  kernel' = kernel * s,  bias' = bias - mean * s

(`s` broadcast over the output axis). The folded net costs a plain net's
inference and nothing more.

Each model says how it folds, with its class attribute `folds`, and satisfies
the matching contract of `dirac_jax.folded`:

* `"chain"` (DiracNet, MobileNet; `folded.ChainFoldable`): no shortcut, so the
  whole net folds into a chain of conv-ReLU pairs. `fold` checks the variables
  and asks the model (`model.fold_chain`), which walks its own plan with its
  own kernel factories (`folded.ChainBuilder`), so the folded kernel comes from
  the same transform code the model runs.
* `"kernels"` (WRN, ResNet; `folded.KernelFoldable`): residual nets are not a
  chain, so `fold` raises for them; `fold_kernels` folds what does fold in
  them, their kernel parameterizations (symmetric kernels, `I + W`): it returns
  the model's `plain_twin()` with every kernel a plain tensor, which
  `dirac_jax.export` writes.
* `None` (PlainNet): no fold.

`deployable` picks the fold a model has and returns the float32 net that
`dirac_jax.export` writes, the trainer's fold check measures and
`dirac_jax.evaluate` reports.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from dirac_jax.models import count_params, get_model
  >>> from dirac_jax.fold import fold, apply_folded, num_params
  >>> model = get_model("diracnet", depth=10, width=0.25)
  >>> x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  >>> variables = model.init(jax.random.key(0), x, train=False)
  >>> folded = fold(model, variables)
  >>> [s.kind for s in folded.steps][:6]
  ['conv', 'relu', 'relu', 'conv', 'relu', 'conv']
  >>> count_params(variables["params"]), num_params(folded)  # a, b and BN are gone.
  (5118, 4946)
  >>> error = jnp.abs(apply_folded(folded, x) - model.apply(variables, x, train=False)).max()
  >>> bool(error < 1e-4)
  True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dirac_jax import param
from dirac_jax.folded import KINDS, ChainFoldable, FoldedNet, KernelFoldable, effective_kernel
from dirac_jax.layers import conv
from dirac_jax.models import VARIANTS, count_params, global_avg_pool, max_pool

__all__ = [
    "apply_folded",
    "deployable",
    "fold",
    "fold_kernels",
    "folded_identity",
    "num_params",
]

# Names of the previous release -> the one name now; they raise an AttributeError naming it.
_RENAMED = {"folded_apply": "deployable"}


def __getattr__(name: str):
    if name in _RENAMED:
        raise AttributeError(
            f"dirac_jax.fold.{name} was renamed: use dirac_jax.fold.{_RENAMED[name]}."
        )
    raise AttributeError(f"module 'dirac_jax.fold' has no attribute {name!r}")


def _folds(model) -> str | None:
    """How `model` folds: `"chain"` or `"kernels"` when it satisfies that contract, else None."""
    how = getattr(model, "folds", None)
    if how == "chain" and isinstance(model, ChainFoldable):
        return how
    if how == "kernels" and isinstance(model, KernelFoldable):
        return how
    return None


def _check_variables(variables, dtype):
    if not (isinstance(variables, Mapping) and "params" in variables):
        raise ValueError(
            "fold: variables must be the dict returned by model.init, with 'params' and "
            f"'batch_stats'; got {type(variables).__name__} with keys "
            f"{sorted(variables) if hasattr(variables, 'keys') else '-'}."
        )
    if "batch_stats" not in variables:
        raise ValueError(
            "fold: variables has no 'batch_stats'; BN folds with its running statistics, "
            "so pass the full {'params', 'batch_stats'} dict."
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"fold: dtype must be a floating dtype, got {dtype!r}.")


def fold(model, variables: Any, *, dtype=jnp.float32, identity_apart: bool = False) -> FoldedNet:
    """Folds Dirac parameterization and BatchNorm into plain convs with bias.

    DiracNets sec. 1/2: Dirac parameterization and BN fold into the filters, so
    the net becomes a chain of conv-ReLU pairs. The model folds itself
    (`model.fold_chain`, `folded.ChainFoldable`; any model that satisfies that
    contract folds here): a DiracNet's
    stem conv uses `kernel_factory("plain")`, its block convs `"dirac"` (v2),
    `"dirac_v1"` (v1) or `"plain"`, exactly as the model; each following BN
    (running statistics, eps `BN_EPSILON`) becomes the conv's bias and a
    per-output-channel scale of its kernel. Pure: no state, works under `jit`.

    Step order (the folded PyTorch `DiracNet` module for the ImageNet stem):
    ImageNet `conv7x7/2, max_pool(3, 2, 1), [relu, conv] x blocks, max_pool(2, 2, 0), ...,
    relu, avg_pool, dense`; CIFAR `conv3x3, relu, [relu, conv] x blocks, ...`;
    v1 blocks are `[ncrelu, conv]` and its head has no `relu`. MobileNet:
    `conv3x3/2, relu, [conv3x3 depthwise, relu, conv1x1, relu] x 13, avg_pool, dense`.

    Args:
      model: a `folded.ChainFoldable`: a `DiracNet` of variant `"v2"`, `"v1"`
        or `"plain"`, or a `MobileNet`, symmetric or not (its `dtype` is
        ignored; the folded net is computed in `dtype`).
      variables: `{"params", "batch_stats"}` as returned by `model.init` or training.
      dtype: dtype of every computation and of the folded parameters; use
        `jnp.float64` under `jax.enable_x64(True)` for a tighter fold.
      identity_apart: keep the identity of every Dirac kernel apart: a block
        conv `BN(conv(x, diag(a) I + diag(b) W_norm))` (DiracNets eq. 5) becomes
        a `"dirac_conv"` step, `conv(x, s b W_norm) + s a x + bias'` with `s`
        the BN scale, instead of one `"conv"` of the summed kernel. Same
        function; an INT8 deploy then quantizes `s b W_norm` on its own scale
        instead of one set by the centre tap `s a` (`dirac_jax.quantize`).

    Returns:
      A `folded.FoldedNet`; run it with `apply_folded`.

    Raises:
      ValueError: `model` does not fold into a chain (a WRN or ResNet, whose
        kernels `fold_kernels` folds, or a PlainNet), `variables` lacks
        `params` or `batch_stats`, `variables` belong to another model (a
        missing layer, a kernel shape or parameter set that does not match the
        plan), or `dtype` is not floating.
    """
    if _folds(model) != "chain":
        why = (
            "residual nets are not a chain, so their BN and shortcuts cannot fold into one conv "
            "per layer; fold_kernels folds their kernels"
            if _folds(model) == "kernels"
            else "it has no fold"
        )
        raise ValueError(
            f"fold supports DiracNet variants {VARIANTS}, MobileNet and other models that "
            f"satisfy folded.ChainFoldable, got {type(model).__name__}: {why}."
        )
    _check_variables(variables, dtype)
    try:
        return model.fold_chain(
            variables["params"],
            variables["batch_stats"],
            dtype=dtype,
            identity_apart=identity_apart,
        )
    except KeyError as e:
        raise ValueError(
            f"fold: variables have no entry {e} that the model's plan needs; pass the variables "
            "that belong to this model (same depth, stem and variant)."
        ) from e


def fold_kernels(model, variables: Any, *, dtype=jnp.float32):
    """A residual net with every kernel computed once: `(plain_model, plain_variables)`.

    A WRN or ResNet keeps its shortcuts, so it does not fold into a chain
    (`fold`), and its pre-activation BNs (WRN) sit behind a ReLU; but its kernel
    parameterizations fold: each symmetric kernel (`symmetry`, the slides) and
    each `I + W` kernel (`dirac_init_sigma`, DiracNets v2 sec. 3.4) is computed
    by the model's own transform and stored as a plain kernel. The result is
    the model's `plain_twin()`, the same architecture with `symmetry=None` and
    `dirac_init_sigma=None`, whose convs are `param.plain` (`{"w": kernel}`) and
    compute exactly what the trained net computes. BatchNorm statistics and the
    classifier are copied. Pure: works under `jit`.

    Args:
      model: a `folded.KernelFoldable`: a `WideResNet` or `ResNet`, symmetric or not.
      variables: `{"params", "batch_stats"}` of that model.
      dtype: dtype of the computed kernels (the other leaves keep theirs).

    Returns:
      `(plain_model, plain_variables)`: `plain_model.apply(plain_variables, x)`
      equals `model.apply(variables, x)` up to float rounding.

    Raises:
      ValueError: `model` is not a WRN or ResNet, or `variables` belong to
        another model.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from dirac_jax.models import get_model
      >>> model = get_model("wrn", depth=10, width=0.25, symmetry="triangular")
      >>> x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> plain, plain_vars = fold_kernels(model, variables)
      >>> plain.symmetry, plain_vars["params"]["group0_block0"]["conv1"]["w"].shape
      (None, (3, 3, 4, 4))
      >>> error = jnp.abs(plain.apply(plain_vars, x) - model.apply(variables, x)).max()
      >>> bool(error < 1e-5)
      True
    """
    if _folds(model) != "kernels":
        raise ValueError(
            f"fold_kernels: expected a WideResNet or ResNet, got {type(model).__name__}; "
            "DiracNets and MobileNets fold into a chain with fold()."
        )
    _check_variables(variables, dtype)
    params = variables["params"]
    twin = model.plain_twin()
    try:
        stem = params["conv"]["w"]
    except KeyError as e:
        raise ValueError(
            "fold_kernels: variables have no stem conv 'conv'; pass this model's."
        ) from e
    # Parameter shapes do not depend on the image size (global pooling): a small input will do.
    x = jax.ShapeDtypeStruct((1, 32, 32, stem.shape[-2]), jnp.float32)
    shapes = jax.eval_shape(lambda x: twin.init(jax.random.key(0), x), x)["params"]

    def walk(shape_tree, raw_tree, path):
        out = {}
        for name, sub in shape_tree.items():
            where = "/".join((*path, name))
            if name not in raw_tree:
                raise ValueError(f"fold_kernels: variables have no {where!r}; pass this model's.")
            if isinstance(sub, Mapping) and set(sub) == {"w"}:  # a conv of the plain twin
                factory = model.kernel_factory_of((*path, name))
                raw, shape = raw_tree[name], sub["w"].shape
                kernel = effective_kernel(
                    factory, raw, shape, what="kernel", where=where, dtype=dtype
                )
                out[name] = {"w": kernel}
            elif isinstance(sub, Mapping):
                out[name] = walk(sub, raw_tree[name], (*path, name))
            else:
                out[name] = raw_tree[name]
        return out

    return twin, {"params": walk(shapes, params, ()), "batch_stats": variables["batch_stats"]}


def deployable(model, variables: Any, *, dtype=jnp.float32):
    """The deployable net of a trained model: `(apply, params)`, `apply(params, images)`.

    The one "fold to `dtype`" of the library: DiracNets and MobileNets fold
    into a chain (`fold`; `apply` is `apply_folded`); WRNs and ResNets keep
    their shortcuts and fold their kernels (`fold_kernels`; `apply` runs the
    plain twin). This is the net `dirac_jax.export` writes, the trainer's fold
    check compares with the trained one, and `dirac_jax.evaluate` reports as
    `folded`. The model computes in `dtype` whatever its own `dtype` (a
    bfloat16 run's net is deployed in float32).

    Args:
      model: a model that folds (`folded.ChainFoldable` or `folded.KernelFoldable`).
      variables: its `{"params", "batch_stats"}`.
      dtype: dtype of the computation and of the folded parameters.

    Returns:
      `(apply, params)`: `apply(params, images)` computes the logits of
      normalized NHWC images.

    Raises:
      ValueError: a model that does not fold (its `folds` is None, e.g.
        PlainNet), or variables of another model.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from dirac_jax.models import get_model
      >>> model = get_model("wrn", depth=10, width=0.25)
      >>> x = jnp.ones((1, 32, 32, 3))
      >>> variables = model.init(jax.random.key(0), x)
      >>> apply, params = deployable(model, variables)
      >>> bool(jnp.allclose(apply(params, x), model.apply(variables, x), atol=1e-5))
      True
    """
    if _folds(model) == "kernels":
        twin, twin_variables = fold_kernels(model, variables, dtype=dtype)
        twin = twin.clone(dtype=dtype)
        return (lambda v, x: twin.apply(v, x, train=False)), twin_variables
    return apply_folded, fold(model, variables, dtype=dtype)


def apply_folded(folded: FoldedNet, images: jax.Array) -> jax.Array:
    """Runs a folded net on NHWC images; pure JAX, `jit`-able.

    Computes in the dtype of the folded parameters (the `dtype` given to
    `fold`), and returns logits of that dtype.

    Args:
      folded: the result of `fold`.
      images: `(batch, height, width, channels)` floats.

    Returns:
      Logits `(batch, num_classes)`.

    Raises:
      ValueError: if `images` is not 4-D.
    """
    if images.ndim != 4:
        raise ValueError(f"apply_folded: images must be NHWC (4-D), got shape {images.shape}.")
    dtype = next(p["kernel"].dtype for p in folded.params if p)
    x = images.astype(dtype)
    for step, p in zip(folded.steps, folded.params, strict=True):
        if step.kind == "conv":
            strides, padding, *groups = step.args
            groups = groups[0] if groups else 1
            x = conv(x, p["kernel"], strides=strides, padding=padding, groups=groups) + p["bias"]
        elif step.kind == "dirac_conv":
            strides, padding, sources = step.args
            y = conv(x, p["kernel"], strides=strides, padding=padding) + p["bias"]
            x = y + folded_identity(x, p["scale"], sources)
        elif step.kind == "relu":
            x = jax.nn.relu(x)
        elif step.kind == "ncrelu":
            x = param.ncrelu(x)
        elif step.kind == "max_pool":
            x = max_pool(x, *step.args)
        elif step.kind == "avg_pool":
            x = global_avg_pool(x)
        elif step.kind == "dense":
            x = x @ p["kernel"] + p["bias"]
        else:
            raise ValueError(
                f"apply_folded: unknown step kind {step.kind!r}; expected one of {KINDS}."
            )
    return x


def folded_identity(x: jax.Array, scale: jax.Array, sources) -> jax.Array:
    """The identity part of a Dirac conv (stride 1, SAME) on NHWC `x`, without a conv.

    Output channel `j` is `scale[j]` times the sum of the input channels
    `sources[j]` (`param.Identity.sources`; `-1` pads a row): the centre tap
    of `scale * delta` (DiracNets eq. 2) as a channel selection.
    """
    src = np.asarray(sources, np.int32).reshape(len(sources), -1)
    if src.shape == (x.shape[-1], 1) and (src[:, 0] == np.arange(len(src))).all():
        return x * scale  # a square delta: the input itself
    total = 0
    for k in range(src.shape[1]):
        column = src[:, k]
        keep = jnp.asarray(column >= 0, x.dtype)
        total = total + jnp.take(x, np.maximum(column, 0), axis=-1) * keep
    return total * scale


def num_params(folded: FoldedNet) -> int:
    """Total number of scalars in the folded parameters (kernels and biases)."""
    return int(count_params(folded.params))
