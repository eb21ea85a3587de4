"""DiracNet (v2 and v1) and its plain baseline, DiracNets Table 1 and sec. 3.

One module serves three variants, as in the papers, where the plain baseline is
the same architecture without the Dirac parameterization:

* `"v2"`: block `ReLU -> conv(diag(a) I + diag(b) W_norm) -> BN` (eq. 5), per-channel `a`, `b`.
* `"v1"`: block `NCReLU -> conv(a delta + b W_norm) -> BN` (v1 eqs. 4, 9), scalar
  `a`, `b`, input channels doubled by NCReLU and deltas repeated (v1 sec. 2.1).
* `"plain"`: block `ReLU -> conv(W) -> BN` with He-normal `W`.

Architecture details follow the reference code (szagoruyko/diracnets):
CIFAR stem `conv3x3(16k) -> BN -> ReLU`, three groups of `2n` layers with
`n = (depth - 4) / 6`, widths `16k, 32k, 64k`, a 2x2 max-pool between groups,
head `ReLU -> global average pool -> linear`. ImageNet stem
`conv7x7/2(64k) -> BN -> max-pool 3/2`, four groups of `2 x [2, 2, 2, 2]`
(depth 18) or `2 x [3, 4, 6, 3]` (depth 34) layers, widths `64k .. 512k`.
The first layer of a group changes the width; its delta is non-square
(`torch.nn.init.dirac_` rule in v2, repeated blocks in v1). BatchNorm scales are
initialized from `U[0, 1)` as in the reference.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from dirac_jax import folded, param
from dirac_jax.models._layers import (
    ParamConv,
    batch_norm,
    dense,
    global_avg_pool,
    kernel_factory,
    max_pool,
)

VARIANTS = ("v2", "v1", "plain")
# The kernel parameterization (a `kernel_factory` name) of each variant's block convs;
# `DiracNet.fold_chain` recomputes the kernels with the same names.
BLOCK_KERNELS = {"v2": "dirac", "v1": "dirac_v1", "plain": "plain"}
STEMS = ("cifar", "imagenet")
IMAGENET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
# Channels of each group at width 1; the stem outputs the first group's width.
GROUP_BASES = {"cifar": (16, 32, 64), "imagenet": (64, 128, 256, 512)}


class Step(NamedTuple):
    """One step of a network's static plan; the forward pass and `DiracNet.fold_chain` walk it.

    kind: `"conv"`, `"bn"`, `"relu"`, `"ncrelu"`, `"max_pool"`, `"avg_pool"`,
    `"dense"` or `"group"` (a run of blocks `act -> conv -> bn`).
    """

    kind: str
    name: str = ""
    args: tuple = ()


def check_width(width: float, base: int) -> int:
    """The channels `int(base * width)` of a group; raises for a bad width or zero channels."""
    if not (isinstance(width, int | float) and width > 0):
        raise ValueError(f"width must be a positive number, got {width!r}.")
    channels = int(base * width)
    if channels < 1:
        raise ValueError(
            f"width {width!r} gives {channels} channels for a {base}-channel group; "
            "use a larger width."
        )
    return channels


def diracnet_plan(
    depth: int, width: float, num_classes: int, stem: str, variant: str
) -> tuple[Step, ...]:
    """The layer plan of a DiracNet; validates the arguments.

    Raises:
      ValueError: a CIFAR depth that is not `6n + 4` with `n >= 1`, an ImageNet
        depth other than 18 or 34, a width `<= 0`, an unknown stem or variant,
        or `num_classes < 1`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown DiracNet variant {variant!r}; expected one of {VARIANTS}.")
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; expected one of {STEMS}.")
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    act = "ncrelu" if variant == "v1" else "relu"
    if stem == "cifar":
        if not (isinstance(depth, int) and depth >= 10 and (depth - 4) % 6 == 0):
            raise ValueError(
                f"depth {depth!r} is not valid for the CIFAR DiracNet: it must be 6n+4 with n >= 1 "
                "(10, 16, 22, 28, 34, ...)."
            )
        counts = (2 * ((depth - 4) // 6),) * 3
        widths = [check_width(width, b) for b in GROUP_BASES["cifar"]]
        steps = [Step("conv", "conv", (widths[0], 3, 1, 1)), Step("bn", "bn"), Step("relu")]
    else:
        if depth not in IMAGENET_BLOCKS:
            raise ValueError(
                f"depth {depth!r} is not valid for the ImageNet DiracNet: "
                f"expected one of {sorted(IMAGENET_BLOCKS)}."
            )
        counts = tuple(2 * b for b in IMAGENET_BLOCKS[depth])
        widths = [check_width(width, b) for b in GROUP_BASES["imagenet"]]
        steps = [
            Step("conv", "conv", (widths[0], 7, 2, 3)),
            Step("bn", "bn"),
            Step("max_pool", args=(3, 2, 1)),
        ]
    ni = widths[0]
    for g, (no, count) in enumerate(zip(widths, counts, strict=True)):
        if g:
            steps.append(Step("max_pool", args=(2, 2, 0)))
        steps.append(Step("group", f"group{g}", (act, ni, no, count)))
        ni = no
    if variant != "v1":  # v1's reference head pools the BN output directly.
        steps.append(Step("relu"))
    steps += [Step("avg_pool"), Step("dense", "fc", (num_classes,))]
    return tuple(steps)


def _at(tree, path):
    for name in path:
        tree = tree[name]
    return tree


def _check_shape(raw, expected_shape, where):
    shape = tuple(raw["w"].shape)
    if shape != tuple(expected_shape):
        raise ValueError(
            f"fold: the conv kernel at {where} has shape {shape} but the model's plan expects "
            f"{tuple(expected_shape)}; pass the variables that belong to this model."
        )
    return shape


class _Block(nn.Module):
    act: str
    features: int
    factory: Any
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        x = param.ncrelu(x) if self.act == "ncrelu" else nn.relu(x)
        x = ParamConv(self.features, (3, 3), self.factory, dtype=self.dtype, name="conv")(x)
        return batch_norm(train, self.dtype, nn.initializers.uniform(1.0), name="bn")(x)


class _Group(nn.Module):
    act: str
    features: int
    count: int
    factory: Any
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        for i in range(self.count):
            x = _Block(self.act, self.features, self.factory, self.dtype, name=f"block{i}")(
                x, train
            )
        return x


class DiracNet(nn.Module):
    """DiracNet v2 / v1 / plain baseline for CIFAR (depth `6n+4`) or ImageNet (18, 34).

    Attributes:
      depth: `6n + 4` for the CIFAR stem, 18 or 34 for the ImageNet stem.
      width: the width multiplier `k` (a float; channels are `int(base * k)`).
      num_classes: classifier outputs.
      stem: `"cifar"` (32x32 inputs) or `"imagenet"`.
      variant: `"v2"`, `"v1"` or `"plain"` (module docstring).
      dtype: computation dtype (params stay float32).
    """

    depth: int = 28
    width: float = 10
    num_classes: int = 10
    stem: str = "cifar"
    variant: str = "v2"
    dtype: Any = jnp.float32

    # How `dirac_jax.fold` folds this net: whole, into a chain of convs (`fold_chain`;
    # `folded.ChainFoldable`).
    folds = "chain"

    def plan(self) -> tuple[Step, ...]:
        return diracnet_plan(self.depth, self.width, self.num_classes, self.stem, self.variant)

    def fold_chain(
        self, params, batch_stats, *, dtype, identity_apart: bool = False
    ) -> folded.FoldedNet:
        """This net as a chain of convs with bias: `plan()` with each `bn` folded into its conv.

        The stem conv's kernel comes from `kernel_factory("plain")`, the block
        convs' from `BLOCK_KERNELS[variant]`, so the folded kernel is computed by
        the code the model runs. The steps mirror the plan with the `bn` steps
        removed; the CIFAR stem keeps its `relu` before the first block's `relu`
        (`relu(relu(x)) = relu(x)`), so the steps match the reference layer
        order one to one. With `identity_apart`, each block conv with an
        identity part (v2, v1) is a `"dirac_conv"` step (`folded.split_identity`).
        `dirac_jax.fold.fold` checks the variables and calls this
        (`folded.ChainFoldable`).

        Raises:
          KeyError: a layer the plan names is not in `params` or `batch_stats`.
          ValueError: a kernel shape or parameter set that does not match the plan.
        """
        chain = folded.ChainBuilder(params, batch_stats, dtype=dtype)
        pending = None  # (path, kernel shape, conv args) of a conv awaiting its BN.
        for step in self.plan():
            if step.kind == "conv":
                features, k, stride, pad = step.args
                shape = (k, k, params[step.name]["w"].shape[-2], features)
                pending = ((step.name,), shape, ((stride, stride), ((pad, pad), (pad, pad))))
            elif step.kind == "bn":
                if pending is None:  # pragma: no cover - every plan has conv before bn.
                    raise AssertionError(f"plan has a bn step {step.name!r} with no conv before it")
                path, shape, args = pending
                _check_shape(params[path[0]], shape, path[0])
                plain = kernel_factory("plain")
                chain.conv_bn(plain, path, (step.name,), shape, args, what="plain")
                pending = None
            elif step.kind == "group":
                act, ni, no, count = step.args
                name = BLOCK_KERNELS[self.variant]
                for i in range(count):
                    block = (step.name, f"block{i}")
                    n_in = ni if i == 0 else no
                    n_in = 2 * n_in if act == "ncrelu" else n_in  # NCReLU doubles channels.
                    shape = (3, 3, n_in, no)
                    _check_shape(_at(params, (*block, "conv")), shape, ".".join((*block, "conv")))
                    chain.add(act)
                    chain.conv_bn(
                        kernel_factory(name),
                        (*block, "conv"),
                        (*block, "bn"),
                        shape,
                        folded.BLOCK_CONV_ARGS,
                        what=name,
                        identity_apart=identity_apart,
                    )
            elif step.kind == "dense":
                chain.dense((step.name,))
            elif step.kind in ("relu", "ncrelu", "avg_pool"):
                chain.add(step.kind)
            elif step.kind == "max_pool":
                chain.add("max_pool", tuple(step.args))
            else:  # pragma: no cover - plans are built by diracnet_plan.
                raise AssertionError(f"fold: unexpected plan step {step!r}")
        return chain.build()

    @nn.compact
    def __call__(self, x, train: bool = False):
        block_factory = kernel_factory(BLOCK_KERNELS[self.variant])
        for step in self.plan():
            if step.kind == "conv":
                features, k, stride, pad = step.args
                x = ParamConv(
                    features,
                    (k, k),
                    kernel_factory("plain"),
                    (stride, stride),
                    ((pad, pad), (pad, pad)),
                    dtype=self.dtype,
                    name=step.name,
                )(x)
            elif step.kind == "bn":
                x = batch_norm(train, self.dtype, nn.initializers.uniform(1.0), name=step.name)(x)
            elif step.kind == "relu":
                x = nn.relu(x)
            elif step.kind == "max_pool":
                x = max_pool(x, *step.args)
            elif step.kind == "group":
                act, _, no, count = step.args
                x = _Group(act, no, count, block_factory, self.dtype, name=step.name)(x, train)
            elif step.kind == "avg_pool":
                x = global_avg_pool(x)
            elif step.kind == "dense":
                x = dense(step.args[0], self.dtype, name=step.name)(x)
            else:  # pragma: no cover - plans are built above.
                raise AssertionError(step)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))
