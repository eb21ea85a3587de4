"""Weight parameterizations as pure pytree transforms (depends on jax and numpy only).

Each factory validates a kernel shape in Flax layout `(*spatial, in, out)` and
returns a `Transform`: `init(key) -> raw` and `apply(raw) -> kernel`, plus the
kernel shape and the number of trainable parameters.

Example:
  >>> import jax
  >>> from dirac_jax import param
  >>> t = param.dirac((3, 3, 64, 64))
  >>> kernel = jax.jit(t.apply)(t.init(jax.random.key(0)))
  >>> kernel.shape, t.num_params
  ((3, 3, 64, 64), 36992)
"""

from dirac_jax.param._core import Identity, Transform
from dirac_jax.param._dirac import dirac, dirac_delta, dirac_residual, dirac_v1, ncrelu, normalize
from dirac_jax.param._plain import max_norm, plain, uniform_init
from dirac_jax.param._symmetric import KINDS as SYMMETRIC_KINDS
from dirac_jax.param._symmetric import symmetric, symmetrize, symmetry_penalty
from dirac_jax.param._tree import apply_tree, init_tree, num_params_tree

__all__ = [
    "SYMMETRIC_KINDS",
    "Identity",
    "Transform",
    "apply_tree",
    "dirac",
    "dirac_delta",
    "dirac_residual",
    "dirac_v1",
    "init_tree",
    "max_norm",
    "ncrelu",
    "normalize",
    "num_params_tree",
    "plain",
    "symmetric",
    "symmetrize",
    "symmetry_penalty",
    "uniform_init",
]
