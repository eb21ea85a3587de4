"""The Flax Linen conv layer whose kernel is a `dirac_jax.param` transform."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dirac_jax import param
from dirac_jax.layers._conv import param_conv, spatial_tuple

# kernel_shape -> Transform; e.g. `param.dirac` or `functools.partial(param.plain, init="uniform")`.
KernelFactory = Callable[[tuple[int, ...]], param.Transform]


def kernel_shape(
    kernel_size: int | Sequence[int], in_features: int, features: int, groups: int, n: int | None
) -> tuple[int, ...]:
    """The Flax kernel shape `(*window, in // groups, out)` of a grouped conv.

    Args:
      kernel_size: an int (repeated `n` times) or the window, one size per axis.
      in_features, features: input and output channels.
      groups: feature groups, dividing both.
      n: the number of spatial axes, when `kernel_size` is an int.

    Raises:
      ValueError: `groups` does not divide both channel counts, or bad sizes.
    """
    if isinstance(kernel_size, int):
        if n is None:
            raise ValueError(
                f"kernel_size={kernel_size} is an int: give the number of spatial axes."
            )
        window = spatial_tuple(kernel_size, n, "kernel_size")
    else:
        window = spatial_tuple(kernel_size, len(kernel_size), "kernel_size")
    if not (isinstance(groups, int) and groups >= 1) or in_features % groups or features % groups:
        raise ValueError(
            f"feature_group_count={groups!r} must divide both the {in_features} input and the "
            f"{features} output features."
        )
    return (*window, in_features // groups, features)


def raw_params(module: nn.Module, transform: param.Transform, param_dtype=jnp.float32) -> dict:
    """Declares the transform's raw pytree as Flax params of `module`, one per entry.

    One draw of the whole raw pytree at init, so the entries come from one key as
    `transform.init(key)` makes them. When applying, Flax only evaluates the init
    function abstractly, to check shapes.
    """
    if module.is_initializing():
        fresh = transform.init(module.make_rng("params"))
        return {n: module.param(n, lambda _, v=v: v.astype(param_dtype)) for n, v in fresh.items()}
    names = jax.eval_shape(transform.init, jax.random.key(0)).keys()
    return {
        n: module.param(n, lambda key, n=n: transform.init(key)[n].astype(param_dtype))
        for n in names
    }


class ParamConv(nn.Module):
    """A Linen convolution (1-D, 2-D or 3-D) whose kernel is `factory(kernel_shape).apply(raw)`.

    The raw parameters of the transform (`w`, and `a`, `b` for `param.dirac`)
    are this module's params, under the transform's own names, drawn by its
    `init`. The spatial rank is `len(kernel_size)`; inputs are channels-last
    `(batch, *spatial, features)`, as `flax.linen.Conv`.

    For a grouped Dirac conv give the delta the same groups, so each group keeps
    its identity: `factory=functools.partial(param.dirac, groups=G)` with
    `feature_group_count=G`.

    Mixed precision (`dtype=jnp.bfloat16`): the Dirac identity part is added
    in float32 beside the bfloat16 conv of the rest, so the `W` term at the
    centre diagonal taps is not rounded away (see `layers.param_conv`).

    Attributes:
      features: output channels.
      kernel_size: the window, one size per spatial axis, e.g. `(3, 3)`.
      factory: `kernel_shape -> param.Transform`, e.g. `param.dirac`.
      strides: an int or one per spatial axis.
      padding: `"SAME"`, `"VALID"`, an int, or `(low, high)` pairs.
      kernel_dilation: an int or one per spatial axis.
      feature_group_count: groups; divides input and output features.
      use_bias: add a bias (`"bias"`, zeros at init).
      dtype: computation dtype; `None` promotes input and params.
      param_dtype: dtype of the raw params.
      exact_identity: see `layers.param_conv` (default: when `dtype` is narrow).
      precision: `jax.lax.Precision` of the conv.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dirac_jax import param
      >>> from dirac_jax.layers import ParamConv
      >>> layer = ParamConv(16, (3,), param.dirac)  # 1-D
      >>> x = jnp.ones((2, 20, 16))
      >>> variables = layer.init(jax.random.key(0), x)
      >>> sorted(variables["params"]), layer.apply(variables, x).shape
      (['a', 'b', 'w'], (2, 20, 16))
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    factory: KernelFactory = param.dirac
    strides: int | Sequence[int] = 1
    padding: Any = "SAME"
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    exact_identity: bool | None = None
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = len(self.kernel_size)
        if x.ndim != n + 2:
            raise ValueError(
                f"ParamConv with kernel_size {tuple(self.kernel_size)} takes (batch, *{n} spatial, "
                f"features) inputs, got shape {x.shape}; add a batch axis with x[None]."
            )
        shape = kernel_shape(
            self.kernel_size, x.shape[-1], self.features, self.feature_group_count, None
        )
        t = self.factory(shape)
        raw = raw_params(self, t, self.param_dtype)
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, self.param_dtype)
        y = param_conv(
            x,
            t,
            raw,
            strides=self.strides,
            padding=self.padding,
            dilation=self.kernel_dilation,
            groups=self.feature_group_count,
            dtype=dtype,
            exact_identity=self.exact_identity,
            precision=self.precision,
        )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y
