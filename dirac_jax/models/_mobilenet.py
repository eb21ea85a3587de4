"""MobileNet v1 (Howard et al., 2017) for 224x224 inputs, with the slides' symmetric option.

`conv3x3/2 (32) -> BN -> ReLU`, then 13 depthwise-separable blocks
`depthwise 3x3 (stride) -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU`, global
average pooling and a linear classifier; every width times the width
multiplier. The 1.0x net with 1000 classes has 4,231,976 parameters, the
standard count (convs without bias, BN scale and bias, classifier with bias).

It has no shortcut, so a trained MobileNet folds into a chain of convs and
ReLUs (`MobileNet.fold_chain`, which `dirac_jax.fold` asks), its depthwise convs
as grouped convs.

Symmetric kernels (the slides): the pointwise convs with `in == out` carry a
channel symmetry, the depthwise 3x3s a spatial one (`dirac_jax.models._symmetry`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from dirac_jax import folded
from dirac_jax.models._diracnet import check_width
from dirac_jax.models._layers import (
    ParamConv,
    batch_norm,
    dense,
    global_avg_pool,
    kernel_factory,
)
from dirac_jax.models._symmetry import check_symmetry, symmetric_factory

__all__ = ["MOBILENET_BLOCKS", "MobileNet", "SeparableBlock", "mobilenet_plan"]

STEM_FEATURES = 32
# (output channels at width 1, stride) of the 13 depthwise-separable blocks.
MOBILENET_BLOCKS = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    *((512, 1),) * 5,
    (1024, 2),
    (1024, 1),
)


class SeparableBlock(NamedTuple):
    """One depthwise-separable block: `name`, input and output channels, depthwise stride."""

    name: str
    features_in: int
    features: int
    stride: int


def mobilenet_plan(width: float) -> tuple[int, tuple[SeparableBlock, ...]]:
    """The stem's channels and the 13 blocks at a width multiplier; validates `width`.

    Examples:
      >>> stem, blocks = mobilenet_plan(0.5)
      >>> stem, blocks[0], len(blocks)
      (16, SeparableBlock(name='block0', features_in=16, features=32, stride=1), 13)
    """
    stem = check_width(width, STEM_FEATURES)
    blocks, features_in = [], stem
    for i, (base, stride) in enumerate(MOBILENET_BLOCKS):
        features = check_width(width, base)
        blocks.append(SeparableBlock(f"block{i}", features_in, features, stride))
        features_in = features
    return stem, tuple(blocks)


def _pad1():
    return ((1, 1), (1, 1))


class _Separable(nn.Module):
    block: SeparableBlock
    depthwise_factory: Any
    pointwise_factory: Any
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        b = self.block
        x = ParamConv(
            b.features_in,
            (3, 3),
            self.depthwise_factory,
            (b.stride, b.stride),
            _pad1(),
            feature_group_count=b.features_in,
            dtype=self.dtype,
            name="dw",
        )(x)
        x = nn.relu(batch_norm(train, self.dtype, name="dw_bn")(x))
        x = ParamConv(
            b.features, (1, 1), self.pointwise_factory, padding="VALID", dtype=self.dtype, name="pw"
        )(x)
        return nn.relu(batch_norm(train, self.dtype, name="pw_bn")(x))


class MobileNet(nn.Module):
    """MobileNet v1 with a width multiplier; any input size (224 px in the paper).

    Attributes:
      width: the width multiplier (1.0, 0.75, 0.5, 0.25 in the paper).
      num_classes: classifier outputs.
      symmetry: None or a kind of `param.symmetric`.
      symmetry_axis: `"channel"` (pointwise convs with `in == out`), `"spatial"`
        (every depthwise 3x3) or `"both"` (both sets).
      dtype: computation dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dirac_jax.models import count_params, get_model
      >>> model = get_model("mobilenet", width=0.25, num_classes=10)
      >>> v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
      >>> count_params(v["params"])
      215642
    """

    width: float = 1.0
    num_classes: int = 1000
    symmetry: str | None = None
    symmetry_axis: str = "channel"
    dtype: Any = jnp.float32

    # How `dirac_jax.fold` folds this net: whole, into a chain of convs (`fold_chain`;
    # `folded.ChainFoldable`).
    folds = "chain"

    def plan(self) -> tuple[int, tuple[SeparableBlock, ...]]:
        """The stem's channels and the blocks (`mobilenet_plan`); validates the attributes."""
        check_symmetry(self.symmetry, self.symmetry_axis)
        return mobilenet_plan(self.width)

    def fold_chain(
        self, params, batch_stats, *, dtype, identity_apart: bool = False
    ) -> folded.FoldedNet:
        """This net as a chain: every `conv -> BN -> ReLU` as a conv with bias and a `relu`.

        Steps `conv3x3/2, relu, [conv3x3 depthwise, relu, conv1x1, relu] x 13,
        avg_pool, dense`; the depthwise convs are grouped `"conv"` steps (args
        `(strides, padding, groups)`), and every kernel comes from the model's own
        factories (`factories`), symmetric ones included. Its kernels have no
        identity part, so `identity_apart` changes nothing. `dirac_jax.fold.fold`
        checks the variables and calls this (`folded.ChainFoldable`).

        Raises:
          KeyError: a layer is missing from `params` or `batch_stats`.
          ValueError: a kernel whose parameters do not match the model's.
        """
        stem, blocks = self.plan()
        same, valid = ((1, 1), (1, 1)), ((0, 0), (0, 0))
        chain = folded.ChainBuilder(params, batch_stats, dtype=dtype)

        def conv_relu(factory, what, conv, bn, shape, args):
            chain.conv_bn(factory, conv, bn, shape, args, what=what)
            chain.add("relu")

        stem_shape = (3, 3, params["conv"]["w"].shape[-2], stem)
        plain = kernel_factory("plain")
        conv_relu(plain, "'plain'", ("conv",), ("bn",), stem_shape, ((2, 2), same))
        for b in blocks:
            depthwise, pointwise = self.factories(b)
            args = ((b.stride, b.stride), same, b.features_in)
            shape = (3, 3, 1, b.features_in)
            conv_relu(depthwise, "depthwise", (b.name, "dw"), (b.name, "dw_bn"), shape, args)
            shape = (1, 1, b.features_in, b.features)
            args = ((1, 1), valid)
            conv_relu(pointwise, "pointwise", (b.name, "pw"), (b.name, "pw_bn"), shape, args)
        chain.add("avg_pool")
        chain.dense(("fc",))
        return chain.build()

    def symmetric_layers(self) -> dict[tuple[str, ...], str]:
        """The convs that carry the symmetry: `{module path: axis}`."""
        _, blocks = self.plan()
        layers = {}
        for b in blocks:
            if self.symmetry_axis in ("spatial", "both"):
                layers[(b.name, "dw")] = "spatial"
            if self.symmetry_axis in ("channel", "both") and b.features_in == b.features:
                layers[(b.name, "pw")] = "channel"
        return layers

    def factories(self, block: SeparableBlock):
        """`(depthwise, pointwise)` kernel factories of a block (`fold_chain` uses them too)."""
        plain = kernel_factory("plain")
        if self.symmetry is None:
            return plain, plain
        layers = self.symmetric_layers()
        return tuple(
            symmetric_factory(self.symmetry, layers[(block.name, conv)])
            if (block.name, conv) in layers
            else plain
            for conv in ("dw", "pw")
        )

    @nn.compact
    def __call__(self, x, train: bool = False):
        stem, blocks = self.plan()
        x = ParamConv(
            stem, (3, 3), kernel_factory("plain"), (2, 2), _pad1(), dtype=self.dtype, name="conv"
        )(x)
        x = nn.relu(batch_norm(train, self.dtype, name="bn")(x))
        for b in blocks:
            depthwise, pointwise = self.factories(b)
            x = _Separable(b, depthwise, pointwise, self.dtype, name=b.name)(x, train)
        fc = dense(self.num_classes, self.dtype, name="fc")
        return fc(global_avg_pool(x)).astype(jnp.promote_types(self.dtype, jnp.float32))
