"""Conv layers whose kernel is a `dirac_jax.param` transform, for any model.

Three forms of one computation, in 1-D, 2-D and 3-D, with strides, padding,
kernel dilation, feature groups and mixed precision:

* `ParamConv`: a Flax Linen module (the one the library's models use);
* `NNXParamConv`: a Flax NNX module;
* `param_conv(x, transform, raw, ...)`: a plain JAX function.

With a narrow `dtype` (bfloat16) the Dirac identity part is added exactly in
float32 beside the narrow conv of the rest (`param_conv`).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from dirac_jax import param
  >>> from dirac_jax.layers import param_conv
  >>> t = param.dirac((3, 3, 4, 4))
  >>> raw = t.init(jax.random.key(0))
  >>> raw = {**raw, "b": jnp.zeros(4)}  # a = 1, b = 0: the identity
  >>> x = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))
  >>> bool(jnp.allclose(param_conv(x, t, raw), x))
  True
"""

from dirac_jax.layers._conv import conv, identity_term, param_conv
from dirac_jax.layers._linen import KernelFactory, ParamConv, kernel_shape, raw_params
from dirac_jax.layers._nnx import NNXParamConv

__all__ = [
    "KernelFactory",
    "NNXParamConv",
    "ParamConv",
    "conv",
    "identity_term",
    "kernel_shape",
    "param_conv",
    "raw_params",
]
