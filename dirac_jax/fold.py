"""Folding a trained DiracNet or MobileNet into a plain chain of conv-ReLU pairs.

DiracNets sec. 1/2: Dirac parameterization and BN fold into the filters, so the
net becomes a chain of conv-ReLU pairs. At inference the Dirac kernel
`diag(a) I + diag(b) W_norm` (DiracNets eq. 5) is a fixed tensor, and BatchNorm
with running statistics is a per-channel affine map, so each `conv -> BN` pair
is one convolution with a bias:

    s = scale / sqrt(var + eps),  kernel' = kernel * s,  bias' = bias - mean * s

(`s` broadcast over the output axis). The folded net costs a plain net's
inference and nothing more.

`fold` walks the model's own `plan()` and computes every effective kernel with
the model's kernel factory (`models.kernel_factory`), so the folded kernel comes
from the same transform code the model runs. The steps mirror the plan with the
`bn` steps removed; in particular the CIFAR stem keeps its `relu` before the
first block's `relu` (`relu(relu(x)) = relu(x)`), so the steps match the
reference layer order one to one.

MobileNet (v1) has no shortcut either, so it folds the same way: every
`conv -> BN` (the depthwise ones as grouped convs, `FoldedStep` args
`(strides, padding, groups)`) becomes one conv with bias, with its kernel from
the model's own factories, symmetric ones included. Residual nets (WRN,
ResNet) do not fold into a chain: `fold` raises for them. `fold_kernels`
folds what does fold in them, their kernel parameterizations (symmetric
kernels, `I + W`): it returns the same residual net with every kernel a plain
tensor, which `dirac_jax.export` writes.

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
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from dirac_jax import param
from dirac_jax.layers import conv
from dirac_jax.models import (
    BLOCK_KERNELS,
    BN_EPSILON,
    VARIANTS,
    DiracNet,
    MobileNet,
    ResNet,
    WideResNet,
    global_avg_pool,
    kernel_factory,
    max_pool,
)

__all__ = [
    "BLOCK_CONV_ARGS",
    "KINDS",
    "FoldedNet",
    "FoldedStep",
    "apply_folded",
    "fold",
    "fold_conv_bn",
    "fold_kernels",
    "folded_apply",
    "identity_term",
    "num_params",
]

KINDS = ("conv", "dirac_conv", "relu", "ncrelu", "max_pool", "avg_pool", "dense")

# Conv args `(strides, padding)` of every folded 3x3 block conv: stride 1, SAME.
BLOCK_CONV_ARGS = ((1, 1), ((1, 1), (1, 1)))


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
      epsilon: the BN's epsilon (Flax's default is also `1e-5`).

    Returns:
      `{"kernel", "bias"}` in the kernel's dtype.

    Raises:
      ValueError: a statistic's shape is not `(out,)`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dirac_jax import param
      >>> from dirac_jax.fold import fold_conv_bn
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


def _bn_fold(kernel, bn_params, bn_stats, dtype):
    """`conv -> BN(running stats)` of a model's layer as one `(kernel, bias)`."""
    return fold_conv_bn(
        kernel.astype(dtype),
        mean=bn_stats["mean"],
        var=bn_stats["var"],
        scale=bn_params["scale"],
        bn_bias=bn_params["bias"],
    )


def _kernel(factory_name, raw, expected_shape, where, dtype):
    """The effective kernel of one conv, computed by the model's own transform."""
    shape = tuple(raw["w"].shape)
    if shape != tuple(expected_shape):
        raise ValueError(
            f"fold: the conv kernel at {where} has shape {shape} but the model's plan expects "
            f"{tuple(expected_shape)}; pass the variables that belong to this model."
        )
    return _kernel_of(kernel_factory(factory_name), factory_name, raw, shape, where, dtype)


def _kernel_of(factory, what, raw, shape, where, dtype):
    """The kernel `factory(shape).apply(raw)`, after checking `raw` is that transform's."""
    transform = factory(tuple(shape))
    expected = jax.eval_shape(transform.init, jax.random.key(0))
    got = {k: tuple(v.shape) for k, v in raw.items()}
    if got != {k: tuple(v.shape) for k, v in expected.items()}:
        raise ValueError(
            f"fold: the conv at {where} has parameters {got} but its {what} kernel of shape "
            f"{tuple(shape)} needs {sorted(expected)}; pass the variables that belong to this "
            "model (same variant, width and symmetry)."
        )
    raw = {k: v.astype(dtype) for k, v in raw.items()}
    return transform.apply(raw).astype(dtype)


def _check_inputs(model, variables, dtype):
    if isinstance(model, MobileNet):
        pass
    elif not isinstance(model, DiracNet) or model.variant not in VARIANTS:
        raise ValueError(
            f"fold supports DiracNet variants ({VARIANTS}) and MobileNet, got "
            f"{type(model).__name__}: residual nets are not a chain, so their BN and shortcuts "
            "cannot fold into one conv per layer (fold_kernels folds their kernels)."
        )
    _check_variables(variables, dtype)


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


def fold(
    model: DiracNet | MobileNet,
    variables: Any,
    *,
    dtype=jnp.float32,
    identity_apart: bool = False,
) -> FoldedNet:
    """Folds Dirac parameterization and BatchNorm into plain convs with bias.

    DiracNets sec. 1/2: Dirac parameterization and BN fold into the filters, so
    the net becomes a chain of conv-ReLU pairs. The stem conv uses
    `kernel_factory("plain")`, the block convs `"dirac"` (v2), `"dirac_v1"` (v1)
    or `"plain"`, exactly as the model; each following BN (running statistics,
    eps `BN_EPSILON`) becomes the conv's bias and a per-output-channel scale of
    its kernel. Pure: no state, works under `jit`.

    Step order (the folded PyTorch `DiracNet` module for the ImageNet stem):
    ImageNet `conv7x7/2, max_pool(3, 2, 1), [relu, conv] x blocks, max_pool(2, 2, 0), ...,
    relu, avg_pool, dense`; CIFAR `conv3x3, relu, [relu, conv] x blocks, ...`;
    v1 blocks are `[ncrelu, conv]` and its head has no `relu`. MobileNet:
    `conv3x3/2, relu, [conv3x3 depthwise, relu, conv1x1, relu] x 13, avg_pool, dense`.

    Args:
      model: a `DiracNet` of variant `"v2"`, `"v1"` or `"plain"`, or a
        `MobileNet`, symmetric or not (its `dtype` is ignored; the folded net is
        computed in `dtype`).
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
      A `FoldedNet`; run it with `apply_folded`.

    Raises:
      ValueError: `model` is not a DiracNet or MobileNet (e.g. a WRN or ResNet), `variables`
        lacks `params` or `batch_stats`, `variables` belong to another model (a
        missing layer, a kernel shape or parameter set that does not match the
        plan), or `dtype` is not floating.
    """
    _check_inputs(model, variables, dtype)
    params, stats = variables["params"], variables["batch_stats"]
    steps, folded = [], []

    def emit(kind, args=(), p=None):
        steps.append(FoldedStep(kind, args))
        folded.append({} if p is None else p)

    walk = _walk_mobilenet if isinstance(model, MobileNet) else _walk
    try:
        walk(model, params, stats, dtype, emit, identity_apart)
    except KeyError as e:
        raise ValueError(
            f"fold: variables have no entry {e} that the model's plan needs; pass the variables "
            "that belong to this model (same depth, stem and variant)."
        ) from e
    return FoldedNet(params=tuple(folded), steps=tuple(steps))


def fold_kernels(model: WideResNet | ResNet, variables: Any, *, dtype=jnp.float32):
    """A residual net with every kernel computed once: `(plain_model, plain_variables)`.

    A WRN or ResNet keeps its shortcuts, so it does not fold into a chain
    (`fold`), and its pre-activation BNs (WRN) sit behind a ReLU; but its kernel
    parameterizations fold: each symmetric kernel (`symmetry`, the slides) and
    each `I + W` kernel (`dirac_init_sigma`, DiracNets v2 sec. 3.4) is computed
    by the model's own transform and stored as a plain kernel. The result is
    the same architecture with `symmetry=None` and `dirac_init_sigma=None`, whose
    convs are `param.plain` (`{"w": kernel}`) and compute exactly what the
    trained net computes. BatchNorm statistics and the classifier are copied.
    Pure: works under `jit`.

    Args:
      model: a `WideResNet` or `ResNet`, symmetric or not.
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
    if not isinstance(model, WideResNet | ResNet):
        raise ValueError(
            f"fold_kernels: expected a WideResNet or ResNet, got {type(model).__name__}; "
            "DiracNets and MobileNets fold into a chain with fold()."
        )
    _check_variables(variables, dtype)
    params = variables["params"]
    twin = model.clone(symmetry=None, dirac_init_sigma=None)
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
                kernel = _kernel_of(factory, "kernel", raw_tree[name], sub["w"].shape, where, dtype)
                out[name] = {"w": kernel}
            elif isinstance(sub, Mapping):
                out[name] = walk(sub, raw_tree[name], (*path, name))
            else:
                out[name] = raw_tree[name]
        return out

    return twin, {"params": walk(shapes, params, ()), "batch_stats": variables["batch_stats"]}


def folded_apply(model, variables: Any, *, dtype=jnp.float32):
    """The deployable net of a trained model: `(apply, folded)`, `apply(folded, images)`.

    DiracNets and MobileNets fold into a chain (`fold`, `apply_folded`); WRNs
    and ResNets keep their shortcuts and fold their kernels (`fold_kernels`).
    This is the net `dirac_jax.export` writes and the training fold check
    compares with the trained one.

    Raises:
      ValueError: a model that does not fold (e.g. PlainNet), or variables of
        another model.
    """
    if isinstance(model, WideResNet | ResNet):
        twin, twin_variables = fold_kernels(model, variables, dtype=dtype)
        return (lambda v, x: twin.apply(v, x, train=False)), twin_variables
    return apply_folded, fold(model, variables, dtype=dtype)


def _split_fold(name, raw, shape, where, bn_params, bn_stats, dtype):
    """`(params, sources)` of a `"dirac_conv"`: the kernel's identity and rest, BN folded."""
    _kernel(name, raw, shape, where, dtype)  # the same shape and parameter checks
    identity = kernel_factory(name)(tuple(shape)).identity
    raw = {k: v.astype(dtype) for k, v in raw.items()}
    folded = _bn_fold(identity.rest(raw).astype(dtype), bn_params, bn_stats, dtype)
    s = jnp.asarray(bn_params["scale"], dtype) / jnp.sqrt(
        jnp.asarray(bn_stats["var"], dtype) + BN_EPSILON
    )
    scale = jnp.broadcast_to(jnp.asarray(identity.scale(raw), dtype), s.shape) * s
    sources = tuple(tuple(int(i) for i in row) for row in identity.sources)
    return {"kernel": folded["kernel"], "scale": scale, "bias": folded["bias"]}, sources


def _walk(model, params, stats, dtype, emit, identity_apart=False):
    """Emits the folded steps of `model.plan()`, one `bn` folded into each conv."""
    pending = None  # (kernel, conv args) of a conv awaiting its BN.
    for step in model.plan():
        if step.kind == "conv":
            features, k, stride, pad = step.args
            raw = params[step.name]
            shape = (k, k, raw["w"].shape[-2], features)
            kernel = _kernel("plain", raw, shape, step.name, dtype)
            pending = (kernel, ((stride, stride), ((pad, pad), (pad, pad))))
        elif step.kind == "bn":
            if pending is None:  # pragma: no cover - every plan has conv before bn.
                raise AssertionError(f"plan has a bn step {step.name!r} with no conv before it")
            kernel, args = pending
            emit("conv", args, _bn_fold(kernel, params[step.name], stats[step.name], dtype))
            pending = None
        elif step.kind == "group":
            act, ni, no, count = step.args
            for i in range(count):
                block_p, block_s = params[step.name][f"block{i}"], stats[step.name][f"block{i}"]
                n_in = ni if i == 0 else no
                n_in = 2 * n_in if act == "ncrelu" else n_in  # NCReLU doubles channels.
                where = f"{step.name}.block{i}.conv"
                name, shape = BLOCK_KERNELS[model.variant], (3, 3, n_in, no)
                emit(act)
                if identity_apart and kernel_factory(name)(shape).identity is not None:
                    p, sources = _split_fold(
                        name, block_p["conv"], shape, where, block_p["bn"], block_s["bn"], dtype
                    )
                    emit("dirac_conv", (*BLOCK_CONV_ARGS, sources), p)
                    continue
                kernel = _kernel(name, block_p["conv"], shape, where, dtype)
                emit("conv", BLOCK_CONV_ARGS, _bn_fold(kernel, block_p["bn"], block_s["bn"], dtype))
        elif step.kind == "dense":
            fc = params[step.name]
            emit("dense", (), {k: fc[k].astype(dtype) for k in ("kernel", "bias")})
        elif step.kind in ("relu", "ncrelu", "avg_pool"):
            emit(step.kind)
        elif step.kind == "max_pool":
            emit("max_pool", tuple(step.args))
        else:  # pragma: no cover - plans are built by diracnet_plan.
            raise AssertionError(f"fold: unexpected plan step {step!r}")


def _walk_mobilenet(model, params, stats, dtype, emit, identity_apart=False):
    """Emits the folded steps of a MobileNet: every `conv -> BN -> ReLU` as `conv, relu`.

    Its kernels have no identity part, so `identity_apart` changes nothing.
    """
    stem, blocks = model.validate()
    same, valid = ((1, 1), (1, 1)), ((0, 0), (0, 0))

    def conv(factory, what, path, shape, args):
        *scope, name = path
        p, s = _at(params, scope), _at(stats, scope)
        where = ".".join(path)
        kernel = _kernel_of(factory, what, p[name], shape, where, dtype)
        emit("conv", args, _bn_fold(kernel, p[f"{name}_bn"], s[f"{name}_bn"], dtype))
        emit("relu")

    # The stem's BN is "bn", beside "conv": give it the "conv_bn" name `conv` looks up.
    channels = params["conv"]["w"].shape[-2]
    params = {**params, "conv_bn": params["bn"]}
    stats = {**stats, "conv_bn": stats["bn"]}
    conv(kernel_factory("plain"), "'plain'", ("conv",), (3, 3, channels, stem), ((2, 2), same))
    for b in blocks:
        depthwise, pointwise = model.factories(b)
        args = ((b.stride, b.stride), same, b.features_in)
        conv(depthwise, "depthwise", (b.name, "dw"), (3, 3, 1, b.features_in), args)
        shape = (1, 1, b.features_in, b.features)
        conv(pointwise, "pointwise", (b.name, "pw"), shape, ((1, 1), valid))
    emit("avg_pool")
    fc = params["fc"]
    emit("dense", (), {k: fc[k].astype(dtype) for k in ("kernel", "bias")})


def _at(tree, path):
    for name in path:
        tree = tree[name]
    return tree


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
            x = y + identity_term(x, p["scale"], sources)
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


def identity_term(x: jax.Array, scale: jax.Array, sources) -> jax.Array:
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
    return sum(int(x.size) for x in jax.tree.leaves(folded.params))
