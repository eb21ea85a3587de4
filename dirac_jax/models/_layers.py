"""Layers shared by the networks: the kernel factories by name, BN, the head and pools.

The conv itself is `dirac_jax.layers.ParamConv`, the layer users put into their
own models too.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from dirac_jax import param
from dirac_jax.folded import BN_EPSILON
from dirac_jax.layers import KernelFactory, ParamConv

__all__ = [
    "BN_EPSILON",
    "BN_MOMENTUM",
    "ParamConv",
    "batch_norm",
    "dense",
    "global_avg_pool",
    "kernel_factory",
    "max_pool",
]

# PyTorch's BatchNorm momentum (0.1 = Flax 0.9), as the reference checkpoints were trained; the
# epsilon is `folded.BN_EPSILON`, which the fold and the checkpoint import rely on too.
BN_MOMENTUM = 0.9


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
    """The mean over the spatial axes of NHWC features."""
    return jnp.mean(x, axis=(1, 2))


def max_pool(x, window: int, stride: int, pad: int = 0):
    """Square max pooling of NHWC features; padding counts as `-inf`."""
    return nn.max_pool(x, (window, window), (stride, stride), padding=((pad, pad), (pad, pad)))
