"""Layers shared by the networks: a conv whose kernel comes from a `param.Transform`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dirac_jax import param

# kernel_shape -> Transform; e.g. `param.dirac` or `functools.partial(param.plain, init="uniform")`.
KernelFactory = Callable[[tuple[int, ...]], param.Transform]

# PyTorch's BatchNorm defaults (momentum 0.1 = Flax 0.9, eps 1e-5): the reference
# checkpoints were trained with them, and the fold and interop rely on the same eps.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def kernel_factory(name: str, **kwargs) -> KernelFactory:
    """Returns the kernel factory called `name`, with `kwargs` bound.

    Names: `"dirac"` (DiracNets eq. 5), `"dirac_v1"` (v1 eq. 4 with repeated
    deltas), `"dirac_residual"` (`I + W`, needs `sigma`), `"plain"` (He normal),
    `"uniform"` (the PlainNet init).
    """
    factories = {
        "dirac": param.dirac,
        "dirac_v1": param.dirac_v1,
        "dirac_residual": param.dirac_residual,
        "plain": param.plain,
        "uniform": functools.partial(param.plain, init="uniform"),
    }
    if name not in factories:
        raise ValueError(
            f"unknown kernel parameterization {name!r}; expected one of {sorted(factories)}."
        )
    return functools.partial(factories[name], **kwargs)


def conv_nd(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding, groups: int = 1):
    """NHWC convolution with a Flax-layout kernel; the one conv the library uses."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=tuple(strides),
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


class ParamConv(nn.Module):
    """A 2-D convolution whose kernel is `factory(kernel_shape).apply(raw)`.

    The raw parameters (`w`, and `a`, `b` for Dirac) are Flax params of this
    module, initialized by the transform's `init`. The kernel is computed in
    float32 and cast to `dtype` for the convolution (mixed precision).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    factory: KernelFactory = param.dirac
    strides: tuple[int, int] = (1, 1)
    padding: Any = "SAME"
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        shape = (*self.kernel_size, x.shape[-1], self.features)
        t = self.factory(shape)
        # One draw of the whole raw pytree, then one Flax param per entry (w, a, b). When
        # applying, Flax only evaluates the init function abstractly, to check shapes.
        if self.is_initializing():
            fresh = t.init(self.make_rng("params"))
            raw = {n: self.param(n, lambda _, v=v: v) for n, v in fresh.items()}
        else:
            names = jax.eval_shape(t.init, jax.random.key(0)).keys()
            raw = {n: self.param(n, lambda key, n=n: t.init(key)[n]) for n in names}
        kernel = t.apply(raw).astype(self.dtype)
        y = conv_nd(x.astype(self.dtype), kernel, self.strides, self.padding)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(self.dtype)
        return y


def batch_norm(train: bool, dtype, scale_init=nn.initializers.ones, name=None) -> nn.BatchNorm:
    """BatchNorm with PyTorch's constants; statistics over the whole (global) batch.

    Under `jit` with the batch sharded on a mesh, the mean and variance are
    reduced across devices by XLA, so no `axis_name` is needed.
    """
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        scale_init=scale_init,
        name=name,
    )


def dense(features: int, dtype, name=None) -> nn.Dense:
    """The classifier: Kaiming-normal (fan-in) weights and zero bias, as the reference."""
    return nn.Dense(
        features,
        dtype=dtype,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
        name=name,
    )


def global_avg_pool(x):
    return jnp.mean(x, axis=(1, 2))


def max_pool(x, window: int, stride: int, pad: int = 0):
    return nn.max_pool(x, (window, window), (stride, stride), padding=((pad, pad), (pad, pad)))
