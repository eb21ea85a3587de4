"""Residual baselines: pre-activation WRN-d-k (CIFAR) and ResNet-18/34 (ImageNet).

Both accept the Dirac parameterization as initialization, DiracNets v2 sec. 3.4
eq. 8, via `dirac_init_sigma`: the paper parameterizes the weights as
`W_hat = I + W` "and initializes all weights from N(0, sigma^2), ignoring filter
shapes". So with a `sigma`, every conv (the stem, both convs of each residual
branch and the 1x1 projections) is `I + W` with `W ~ N(0, sigma^2)` (the delta
of a non-square conv is `torch.nn.init.dirac_`'s), and the classifier's kernel is
drawn from `N(0, sigma^2)` (it has no identity). `None` keeps He-normal kernels.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dirac_jax.models._diracnet import GROUP_BASES, IMAGENET_BLOCKS, _check_width
from dirac_jax.models._layers import (
    ParamConv,
    batch_norm,
    dense,
    global_avg_pool,
    kernel_factory,
    max_pool,
)


def _conv_factory(sigma):
    """Every conv's kernel: He normal, or `I + W` with `W ~ N(0, sigma^2)` (sec. 3.4)."""
    if sigma is None:
        return kernel_factory("plain")
    if not (isinstance(sigma, int | float) and sigma >= 0):
        raise ValueError(f"dirac_init_sigma must be a number >= 0 or None, got {sigma!r}.")
    return kernel_factory("dirac_residual", sigma=float(sigma))


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
        y = ParamConv(self.features, (3, 3), self.factory, dtype=self.dtype, name="conv1")(y)
        return y + shortcut


class WideResNet(nn.Module):
    """Pre-activation basic-block WRN-d-k for 32x32 inputs (Zagoruyko & Komodakis, 2016).

    `n = (depth - 4) / 6` blocks per group, widths `16k, 32k, 64k`, strides 1, 2, 2,
    a 1x1 projection where the shape changes; WRN-28-10 has 36.5M parameters.
    """

    depth: int = 28
    width: float = 10
    num_classes: int = 10
    dirac_init_sigma: float | None = None
    dtype: Any = jnp.float32

    def validate(self):
        if not (isinstance(self.depth, int) and self.depth >= 10 and (self.depth - 4) % 6 == 0):
            raise ValueError(
                f"depth {self.depth!r} is not valid for WRN: it must be 6n+4 with n >= 1."
            )
        widths = [_check_width(self.width, b) for b in GROUP_BASES["cifar"]]
        _conv_factory(self.dirac_init_sigma)
        return (self.depth - 4) // 6, widths

    @nn.compact
    def __call__(self, x, train: bool = False):
        n, widths = self.validate()
        factory = _conv_factory(self.dirac_init_sigma)
        x = ParamConv(16, (3, 3), factory, dtype=self.dtype, name="conv")(x)
        for g, (w, stride) in enumerate(zip(widths, (1, 2, 2), strict=True)):
            for i in range(n):
                x = _PreActBlock(
                    w, stride if i == 0 else 1, factory, self.dtype, name=f"group{g}_block{i}"
                )(x, train)
        x = nn.relu(batch_norm(train, self.dtype, name="bn")(x))
        fc = _classifier(self.num_classes, self.dirac_init_sigma, self.dtype)
        return fc(global_avg_pool(x)).astype(jnp.promote_types(self.dtype, jnp.float32))


class _BasicBlock(nn.Module):
    features: int
    stride: int
    factory: Any
    dtype: Any

    @nn.compact
    def __call__(self, x, train: bool):
        s = (self.stride, self.stride)
        y = ParamConv(
            self.features, (3, 3), self.factory, s, _same(3), dtype=self.dtype, name="conv0"
        )(x)
        y = nn.relu(batch_norm(train, self.dtype, name="bn0")(y))
        y = ParamConv(self.features, (3, 3), self.factory, dtype=self.dtype, name="conv1")(y)
        y = batch_norm(train, self.dtype, name="bn1")(y)
        if x.shape[-1] != self.features or self.stride != 1:
            x = _projection(self.features, s, self.factory, self.dtype)(x)
            x = batch_norm(train, self.dtype, name="shortcut_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet-18/34 (He et al., 2016) for 224x224 inputs, basic blocks, projection shortcuts.

    Parameter counts equal torchvision's: 11,689,512 (18) and 21,797,672 (34).
    """

    depth: int = 18
    width: float = 1
    num_classes: int = 1000
    dirac_init_sigma: float | None = None
    dtype: Any = jnp.float32

    def validate(self):
        if self.depth not in IMAGENET_BLOCKS:
            raise ValueError(
                f"depth {self.depth!r} is not valid for ResNet: "
                f"expected one of {sorted(IMAGENET_BLOCKS)}."
            )
        widths = [_check_width(self.width, b) for b in GROUP_BASES["imagenet"]]
        _conv_factory(self.dirac_init_sigma)
        return IMAGENET_BLOCKS[self.depth], widths

    @nn.compact
    def __call__(self, x, train: bool = False):
        blocks, widths = self.validate()
        factory = _conv_factory(self.dirac_init_sigma)
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
                x = _BasicBlock(w, stride, factory, self.dtype, name=f"group{g}_block{i}")(x, train)
        fc = _classifier(self.num_classes, self.dirac_init_sigma, self.dtype)
        return fc(global_avg_pool(x)).astype(jnp.promote_types(self.dtype, jnp.float32))
