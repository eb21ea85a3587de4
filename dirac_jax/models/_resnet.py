"""Residual nets: pre-activation WRN-d-k (CIFAR) and ResNet-18/34/50/101 (ImageNet).

WRN has basic blocks (`block="basic"`, depth `6n + 4`) or pre-activation
bottleneck blocks (`block="bottleneck"`, depth `9n + 2`, He et al. 2016,
"Identity mappings"): `1x1 (w) -> 3x3 (w, stride) -> 1x1 (4w)` with
`w = 16k, 32k, 64k`. ResNet has basic blocks at depths 18 and 34 and
bottlenecks (torchvision's, stride on the 3x3) at 50 and 101.

Symmetric kernels (the slides): `symmetry` (a kind of `param.symmetric`) and
`symmetry_axis` make the second conv of every residual branch, `conv1`,
symmetric; see `dirac_jax.models._symmetry` for the rule and the counts it
gives.

Both accept the Dirac parameterization as initialization, DiracNets v2 sec. 3.4
eq. 8, via `dirac_init_sigma`: the paper parameterizes the weights as
`W_hat = I + W` "and initializes all weights from N(0, sigma^2), ignoring filter
shapes". So with a `sigma`, every conv (the stem, the convs of each residual
branch and the 1x1 projections) is `I + W` with `W ~ N(0, sigma^2)` (the delta
of a non-square conv is `torch.nn.init.dirac_`'s), and the classifier's kernel is
drawn from `N(0, sigma^2)` (it has no identity). `None` keeps He-normal kernels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dirac_jax.models._diracnet import GROUP_BASES, check_width
from dirac_jax.models._layers import (
    ParamConv,
    batch_norm,
    dense,
    global_avg_pool,
    kernel_factory,
    max_pool,
)
from dirac_jax.models._symmetry import check_symmetry, symmetric_factory

BLOCKS = ("basic", "bottleneck")
# ResNet depth -> (block, blocks per group), as torchvision.
RESNET_BLOCKS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
}
BOTTLENECK_EXPANSION = 4
# Module name of the conv that carries the symmetry in every residual branch.
SYMMETRIC_CONV = "conv1"


def _conv_factory(sigma):
    """Every conv's kernel: He normal, or `I + W` with `W ~ N(0, sigma^2)` (sec. 3.4)."""
    if sigma is None:
        return kernel_factory("plain")
    if not (isinstance(sigma, int | float) and sigma >= 0):
        raise ValueError(f"dirac_init_sigma must be a number >= 0 or None, got {sigma!r}.")
    return kernel_factory("dirac_residual", sigma=float(sigma))


def _factories(sigma, symmetry, axis):
    """`(factory, symmetric)`: every conv's factory and that of each branch's `conv1`."""
    check_symmetry(symmetry, axis, sigma)
    factory = _conv_factory(sigma)
    return factory, factory if symmetry is None else symmetric_factory(symmetry, axis)


def _kernel_factory_of(model, path: tuple[str, ...]):
    """The factory of the conv at module `path` of a WRN or ResNet (see `_factories`)."""
    factory, symmetric = _factories(model.dirac_init_sigma, model.symmetry, model.symmetry_axis)
    return symmetric if path in model.symmetric_layers() else factory


def _block_layers(model, blocks_per_group) -> dict[tuple[str, ...], str]:
    return {
        (f"group{g}_block{i}", SYMMETRIC_CONV): model.symmetry_axis
        for g, count in enumerate(blocks_per_group)
        for i in range(count)
    }


def _classifier(num_classes: int, sigma, dtype) -> nn.Dense:
    if sigma is None:
        return dense(num_classes, dtype, name="fc")
    return nn.Dense(
        num_classes, dtype=dtype, kernel_init=nn.initializers.normal(float(sigma)), name="fc"
    )


def _same(k):
    p = k // 2
    return ((p, p), (p, p))


def _projection(features: int, strides: tuple[int, int], factory, dtype) -> ParamConv:
    """The 1x1 shortcut conv used where a residual block changes shape."""
    return ParamConv(features, (1, 1), factory, strides, "VALID", dtype=dtype, name="shortcut")


class _PreActBlock(nn.Module):
    features: int
    stride: int
    factory: Any
    dtype: Any
    symmetric: Any = None  # conv1's factory; None: `factory`.

    @nn.compact
    def __call__(self, x, train: bool):
        s = (self.stride, self.stride)
        o = nn.relu(batch_norm(train, self.dtype, name="bn0")(x))
        shortcut = x
        if x.shape[-1] != self.features or self.stride != 1:
            shortcut = _projection(self.features, s, self.factory, self.dtype)(o)
        y = ParamConv(
            self.features, (3, 3), self.factory, s, _same(3), dtype=self.dtype, name="conv0"
        )(o)
        y = nn.relu(batch_norm(train, self.dtype, name="bn1")(y))
        second = self.symmetric or self.factory
        y = ParamConv(self.features, (3, 3), second, dtype=self.dtype, name="conv1")(y)
        return y + shortcut


class _PreActBottleneck(nn.Module):
    """`BN-ReLU-1x1(w), BN-ReLU-3x3(w, stride), BN-ReLU-1x1(4w)`, plus the shortcut."""

    features: int  # w; the block outputs 4w.
    stride: int
    factory: Any
    dtype: Any
    symmetric: Any = None

    @nn.compact
    def __call__(self, x, train: bool):
        s = (self.stride, self.stride)
        out = BOTTLENECK_EXPANSION * self.features
        o = nn.relu(batch_norm(train, self.dtype, name="bn0")(x))
        shortcut = x
        if x.shape[-1] != out or self.stride != 1:
            shortcut = _projection(out, s, self.factory, self.dtype)(o)
        y = ParamConv(
            self.features, (1, 1), self.factory, padding="VALID", dtype=self.dtype, name="conv0"
        )(o)
        y = nn.relu(batch_norm(train, self.dtype, name="bn1")(y))
        second = self.symmetric or self.factory
        y = ParamConv(self.features, (3, 3), second, s, _same(3), dtype=self.dtype, name="conv1")(y)
        y = nn.relu(batch_norm(train, self.dtype, name="bn2")(y))
        y = ParamConv(out, (1, 1), self.factory, padding="VALID", dtype=self.dtype, name="conv2")(y)
        return y + shortcut


class WideResNet(nn.Module):
    """Pre-activation WRN-d-k for 32x32 inputs (Zagoruyko & Komodakis, 2016).

    Basic blocks: `n = (depth - 4) / 6` per group, widths `16k, 32k, 64k`;
    WRN-28-10 has 36,479,194 parameters. Bottleneck blocks: `n = (depth - 2) / 9`
    per group, inner widths `16k, 32k, 64k`, outputs 4 times that. Strides 1, 2,
    2 between groups, a 1x1 projection where the shape changes.

    Attributes:
      depth, width: `d` and `k`.
      block: `"basic"` or `"bottleneck"`.
      num_classes: classifier outputs.
      dirac_init_sigma: `I + W` kernels with `W ~ N(0, sigma^2)` (module docstring).
      symmetry: None or a kind of `param.symmetric`, for each block's `conv1`.
      symmetry_axis: `"channel"`, `"spatial"` or `"both"`.
      dtype: computation dtype.
    """

    depth: int = 28
    width: float = 10
    num_classes: int = 10
    block: str = "basic"
    dirac_init_sigma: float | None = None
    symmetry: str | None = None
    symmetry_axis: str = "channel"
    dtype: Any = jnp.float32

    # How `dirac_jax.fold` folds this net: it keeps its shortcuts, so only its kernel
    # parameterizations fold (`fold.fold_kernels`, into `plain_twin`'s plain kernels;
    # `folded.KernelFoldable`).
    folds = "kernels"

    def plan(self) -> tuple[int, list[int]]:
        """`(blocks per group, group widths)`; validates the attributes."""
        if self.block not in BLOCKS:
            raise ValueError(f"unknown WRN block {self.block!r}; expected one of {BLOCKS}.")
        per_block, extra = (2, 4) if self.block == "basic" else (3, 2)
        rule = "6n+4" if self.block == "basic" else "9n+2"
        d = self.depth
        if not (
            isinstance(d, int) and d >= 3 * per_block + extra and (d - extra) % (3 * per_block) == 0
        ):
            raise ValueError(
                f"depth {d!r} is not valid for a WRN with {self.block} blocks: it must be "
                f"{rule} with n >= 1."
            )
        widths = [check_width(self.width, b) for b in GROUP_BASES["cifar"]]
        _factories(self.dirac_init_sigma, self.symmetry, self.symmetry_axis)
        return (d - extra) // (3 * per_block), widths

    def symmetric_layers(self) -> dict[tuple[str, ...], str]:
        """The convs that carry the symmetry: `{module path: axis}` (`conv1` of every block)."""
        n, _ = self.plan()
        return _block_layers(self, (n, n, n))

    def kernel_factory_of(self, path: tuple[str, ...]):
        """The kernel factory of the conv at module `path`, e.g. `("group0_block0", "conv1")`."""
        return _kernel_factory_of(self, tuple(path))

    def plain_twin(self):
        """The same net with plain kernels, which `dirac_jax.fold.fold_kernels` fills."""
        return self.clone(symmetry=None, dirac_init_sigma=None)

    @nn.compact
    def __call__(self, x, train: bool = False):
        n, widths = self.plan()
        factory, symmetric = _factories(self.dirac_init_sigma, self.symmetry, self.symmetry_axis)
        block = _PreActBlock if self.block == "basic" else _PreActBottleneck
        x = ParamConv(16, (3, 3), factory, dtype=self.dtype, name="conv")(x)
        for g, (w, stride) in enumerate(zip(widths, (1, 2, 2), strict=True)):
            for i in range(n):
                x = block(
                    w,
                    stride if i == 0 else 1,
                    factory,
                    self.dtype,
                    symmetric,
                    name=f"group{g}_block{i}",
                )(x, train)
        x = nn.relu(batch_norm(train, self.dtype, name="bn")(x))
        fc = _classifier(self.num_classes, self.dirac_init_sigma, self.dtype)
        return fc(global_avg_pool(x)).astype(jnp.promote_types(self.dtype, jnp.float32))


class _BasicBlock(nn.Module):
    features: int
    stride: int
    factory: Any
    dtype: Any
    symmetric: Any = None  # conv1's factory; None: `factory`.

    @nn.compact
    def __call__(self, x, train: bool):
        s = (self.stride, self.stride)
        y = ParamConv(
            self.features, (3, 3), self.factory, s, _same(3), dtype=self.dtype, name="conv0"
        )(x)
        y = nn.relu(batch_norm(train, self.dtype, name="bn0")(y))
        second = self.symmetric or self.factory
        y = ParamConv(self.features, (3, 3), second, dtype=self.dtype, name="conv1")(y)
        y = batch_norm(train, self.dtype, name="bn1")(y)
        if x.shape[-1] != self.features or self.stride != 1:
            x = _projection(self.features, s, self.factory, self.dtype)(x)
            x = batch_norm(train, self.dtype, name="shortcut_bn")(x)
        return nn.relu(x + y)


class _Bottleneck(nn.Module):
    """torchvision's bottleneck: `1x1 (w), 3x3 (w, stride), 1x1 (4w)`, each with BN."""

    features: int  # w; the block outputs 4w.
    stride: int
    factory: Any
    dtype: Any
    symmetric: Any = None

    @nn.compact
    def __call__(self, x, train: bool):
        s = (self.stride, self.stride)
        out = BOTTLENECK_EXPANSION * self.features
        y = ParamConv(
            self.features, (1, 1), self.factory, padding="VALID", dtype=self.dtype, name="conv0"
        )(x)
        y = nn.relu(batch_norm(train, self.dtype, name="bn0")(y))
        second = self.symmetric or self.factory
        y = ParamConv(self.features, (3, 3), second, s, _same(3), dtype=self.dtype, name="conv1")(y)
        y = nn.relu(batch_norm(train, self.dtype, name="bn1")(y))
        y = ParamConv(out, (1, 1), self.factory, padding="VALID", dtype=self.dtype, name="conv2")(y)
        y = batch_norm(train, self.dtype, name="bn2")(y)
        if x.shape[-1] != out or self.stride != 1:
            x = _projection(out, s, self.factory, self.dtype)(x)
            x = batch_norm(train, self.dtype, name="shortcut_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet-18/34/50/101 (He et al., 2016) for 224x224 inputs, projection shortcuts.

    Basic blocks at 18 and 34, bottlenecks (stride on the 3x3) at 50 and 101.
    Parameter counts equal torchvision's: 11,689,512 (18), 21,797,672 (34),
    25,557,032 (50) and 44,549,160 (101).

    Attributes:
      depth: 18, 34, 50 or 101.
      width: multiplies the group widths `64 .. 512` (the bottlenecks' inner widths).
      num_classes: classifier outputs.
      dirac_init_sigma: `I + W` kernels with `W ~ N(0, sigma^2)` (module docstring).
      symmetry: None or a kind of `param.symmetric`, for each block's `conv1`.
      symmetry_axis: `"channel"`, `"spatial"` or `"both"`.
      dtype: computation dtype.
    """

    depth: int = 18
    width: float = 1
    num_classes: int = 1000
    dirac_init_sigma: float | None = None
    symmetry: str | None = None
    symmetry_axis: str = "channel"
    dtype: Any = jnp.float32

    # How `dirac_jax.fold` folds this net: it keeps its shortcuts, so only its kernel
    # parameterizations fold (`fold.fold_kernels`, into `plain_twin`'s plain kernels;
    # `folded.KernelFoldable`).
    folds = "kernels"

    def plan(self) -> tuple[str, tuple[int, ...], list[int]]:
        """`(block kind, blocks per group, group widths)`; validates the attributes."""
        if self.depth not in RESNET_BLOCKS:
            raise ValueError(
                f"depth {self.depth!r} is not valid for ResNet: "
                f"expected one of {sorted(RESNET_BLOCKS)}."
            )
        widths = [check_width(self.width, b) for b in GROUP_BASES["imagenet"]]
        _factories(self.dirac_init_sigma, self.symmetry, self.symmetry_axis)
        block, blocks = RESNET_BLOCKS[self.depth]
        return block, blocks, widths

    def symmetric_layers(self) -> dict[tuple[str, ...], str]:
        """The convs that carry the symmetry: `{module path: axis}` (`conv1` of every block)."""
        _, blocks, _ = self.plan()
        return _block_layers(self, blocks)

    def kernel_factory_of(self, path: tuple[str, ...]):
        """The kernel factory of the conv at module `path`, e.g. `("group0_block0", "conv1")`."""
        return _kernel_factory_of(self, tuple(path))

    def plain_twin(self):
        """The same net with plain kernels, which `dirac_jax.fold.fold_kernels` fills."""
        return self.clone(symmetry=None, dirac_init_sigma=None)

    @nn.compact
    def __call__(self, x, train: bool = False):
        block, blocks, widths = self.plan()
        factory, symmetric = _factories(self.dirac_init_sigma, self.symmetry, self.symmetry_axis)
        module = _BasicBlock if block == "basic" else _Bottleneck
        x = ParamConv(
            widths[0],
            (7, 7),
            factory,
            (2, 2),
            _same(7),
            dtype=self.dtype,
            name="conv",
        )(x)
        x = max_pool(nn.relu(batch_norm(train, self.dtype, name="bn")(x)), 3, 2, 1)
        for g, (w, count) in enumerate(zip(widths, blocks, strict=True)):
            for i in range(count):
                stride = 2 if (g > 0 and i == 0) else 1
                x = module(w, stride, factory, self.dtype, symmetric, name=f"group{g}_block{i}")(
                    x, train
                )
        fc = _classifier(self.num_classes, self.dirac_init_sigma, self.dtype)
        return fc(global_avg_pool(x)).astype(jnp.promote_types(self.dtype, jnp.float32))
