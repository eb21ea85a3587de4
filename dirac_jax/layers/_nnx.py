"""The Flax NNX conv layer whose kernel is a `dirac_jax.param` transform."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dirac_jax import param
from dirac_jax.layers._conv import param_conv
from dirac_jax.layers._linen import KernelFactory, kernel_shape


class NNXParamConv(nnx.Module):
    """An NNX convolution (1-D, 2-D or 3-D) whose kernel is `factory(kernel_shape).apply(raw)`.

    The NNX twin of `ParamConv`, with `flax.nnx.Conv`'s argument names: the
    transform's raw parameters are `nnx.Param` attributes under their own names
    (`w`, `a`, `b` for `param.dirac`), drawn by the transform's `init` from
    `rngs.params()`. Inputs are channels-last `(batch, *spatial, in_features)`.

    For a grouped Dirac conv give the delta the same groups:
    `factory=functools.partial(param.dirac, groups=G)` with `feature_group_count=G`.
    With `dtype=jnp.bfloat16` the Dirac identity part stays exact (see
    `layers.param_conv`).

    Args:
      in_features, out_features: channels.
      kernel_size: an int (with `ndim`, default 2) or one size per spatial axis.
      factory: `kernel_shape -> param.Transform`, e.g. `param.dirac`.
      strides, padding, kernel_dilation, feature_group_count: as `flax.nnx.Conv`.
      use_bias, dtype, param_dtype, precision: as `flax.nnx.Conv`.
      exact_identity: as `layers.param_conv`.
      ndim: spatial axes when `kernel_size` is an int.
      rngs: `nnx.Rngs`; its `params` stream draws the raw parameters.

    Raises:
      ValueError: `feature_group_count` does not divide both channel counts,
        or a size is not positive.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from dirac_jax.layers import NNXParamConv
      >>> layer = NNXParamConv(8, 8, (3, 3, 3), rngs=nnx.Rngs(0))  # 3-D
      >>> layer(jnp.ones((1, 5, 6, 7, 8))).shape
      (1, 5, 6, 7, 8)
      >>> sorted(nnx.state(layer, nnx.Param))
      ['a', 'b', 'w']
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int] = 3,
        factory: KernelFactory = param.dirac,
        *,
        strides: int | Sequence[int] = 1,
        padding: Any = "SAME",
        kernel_dilation: int | Sequence[int] = 1,
        feature_group_count: int = 1,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        exact_identity: bool | None = None,
        precision: Any = None,
        ndim: int = 2,
        rngs: nnx.Rngs,
    ):
        shape = kernel_shape(kernel_size, in_features, out_features, feature_group_count, ndim)
        self.factory, self.kernel_shape = factory, shape
        raw = factory(shape).init(rngs.params())
        self.param_names = tuple(raw)
        for name, value in raw.items():
            setattr(self, name, nnx.Param(value.astype(param_dtype)))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.strides, self.padding = strides, padding
        self.kernel_dilation, self.feature_group_count = kernel_dilation, feature_group_count
        self.dtype, self.param_dtype = dtype, param_dtype
        self.exact_identity, self.precision = exact_identity, precision

    @property
    def transform(self) -> param.Transform:
        """`factory(kernel_shape)`, rebuilt on use: a transform holds arrays NNX would track."""
        return self.factory(self.kernel_shape)

    @property
    def raw(self) -> dict:
        """The transform's raw parameters, `{name: array}`."""
        return {n: getattr(self, n)[...] for n in self.param_names}

    def kernel(self) -> jax.Array:
        """The effective kernel, `transform.apply(raw)` (for folding or inspection)."""
        return self.transform.apply(self.raw)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, self.param_dtype)
        y = param_conv(
            x,
            self.transform,
            self.raw,
            strides=self.strides,
            padding=self.padding,
            dilation=self.kernel_dilation,
            groups=self.feature_group_count,
            dtype=dtype,
            exact_identity=self.exact_identity,
            precision=self.precision,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y
