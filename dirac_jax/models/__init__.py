"""The networks of the papers, in Flax linen (NHWC), chosen by name with `get_model`.

Every conv takes its kernel from a `dirac_jax.param` transform, so the
parameterization is a constructor value, not a separate model.

Each model says how it folds for deployment (`dirac_jax.fold`), in its class
attribute `folds`, and satisfies the matching contract of `dirac_jax.folded`:
`"chain"` (DiracNet, MobileNet; `folded.ChainFoldable`: `fold_chain` builds the
folded conv chain), `"kernels"` (WRN, ResNet; `folded.KernelFoldable`:
`plain_twin` and `kernel_factory_of` let `fold.fold_kernels` compute their
kernels) or None (PlainNet). Every model's `plan()` validates its attributes
and returns its layer plan; `get_model` calls it. WRN, ResNet and MobileNet
name their symmetric convs (`SymmetricLayers`).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from dirac_jax.models import get_model, count_params
  >>> model = get_model("diracnet", depth=10, width=0.5, num_classes=10)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  >>> sorted(variables), count_params(variables["params"])
  (['batch_stats', 'params'], 19442)
  >>> model.apply(variables, jnp.zeros((2, 32, 32, 3)), train=False).shape
  (2, 10)
"""

from __future__ import annotations

import dataclasses

import jax

from dirac_jax.models._diracnet import (
    BLOCK_KERNELS,
    GROUP_BASES,
    IMAGENET_BLOCKS,
    VARIANTS,
    DiracNet,
    Step,
    diracnet_plan,
)
from dirac_jax.models._layers import (
    BN_EPSILON,
    BN_MOMENTUM,
    ParamConv,
    global_avg_pool,
    kernel_factory,
    max_pool,
)
from dirac_jax.models._mobilenet import MOBILENET_BLOCKS, MobileNet, mobilenet_plan
from dirac_jax.models._plainnet import PlainNet
from dirac_jax.models._resnet import BLOCKS, RESNET_BLOCKS, ResNet, WideResNet
from dirac_jax.models._symmetry import (
    SYMMETRY_AXES,
    SymmetricLayers,
    network_symmetry_penalty,
    symmetrize_params,
)

_MODELS = {
    "diracnet": (DiracNet, {"variant": "v2"}),
    "diracnet_v1": (DiracNet, {"variant": "v1"}),
    "plain": (DiracNet, {"variant": "plain"}),
    "wrn": (WideResNet, {}),
    "resnet": (ResNet, {}),
    "mobilenet": (MobileNet, {}),
    "plainnet": (PlainNet, {}),
}
#: The names `config.model.name` may take, each a network class with preset fields.
MODEL_NAMES = tuple(_MODELS)
# How each network folds (its class's `folds`): "chain" (`fold.fold`, a conv-ReLU chain),
# "kernels" (`fold.fold_kernels`, its kernels computed once), or None.
#: How each model name folds, "chain" (`fold.fold`), "kernels" (`fold.fold_kernels`) or None.
FOLDS = {name: cls.folds for name, (cls, _) in _MODELS.items()}


def get_model(name: str, **kwargs):
    """Builds the network called `name`, validating its arguments now.

    Args:
      name: `"diracnet"` (v2), `"diracnet_v1"`, `"plain"` (the DiracNet
        architecture without Dirac parameterization), `"wrn"` (basic or
        bottleneck blocks), `"resnet"` (depth 18, 34, 50, 101),
        `"mobilenet"` (v1) or `"plainnet"`.
      **kwargs: the module's attributes, e.g. `depth`, `width`, `num_classes`,
        `stem` (DiracNets), `block` (WRN), `dirac_init_sigma` (WRN, ResNet),
        `symmetry` and `symmetry_axis` (WRN, ResNet, MobileNet: symmetric
        kernels of the slides, see `network_symmetry_penalty`), `dtype`.

    Returns:
      A Flax module: `model.init(key, x, train=False)` returns
      `{"params", "batch_stats"}`, and `model.apply(variables, x, train=False)`
      returns float32 logits; with `train=True` pass `mutable=["batch_stats"]`.

    Raises:
      ValueError: an unknown name or argument, a bad depth or width, an unknown stem.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}.")
    cls, fixed = _MODELS[name]
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"} - set(fixed)
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"model {name!r} takes no argument(s) {unknown}; it takes {sorted(fields)}."
        )
    model = cls(**fixed, **kwargs)
    model.plan()  # every model validates its attributes while planning its layers
    return model


def count_params(params) -> int:
    """Number of trainable scalars in a params pytree."""
    return sum(x.size for x in jax.tree.leaves(params))


__all__ = [
    "BLOCKS",
    "BLOCK_KERNELS",
    "BN_EPSILON",
    "BN_MOMENTUM",
    "FOLDS",
    "GROUP_BASES",
    "IMAGENET_BLOCKS",
    "MOBILENET_BLOCKS",
    "MODEL_NAMES",
    "RESNET_BLOCKS",
    "SYMMETRY_AXES",
    "VARIANTS",
    "DiracNet",
    "MobileNet",
    "ParamConv",
    "PlainNet",
    "ResNet",
    "Step",
    "SymmetricLayers",
    "WideResNet",
    "count_params",
    "diracnet_plan",
    "get_model",
    "global_avg_pool",
    "kernel_factory",
    "max_pool",
    "mobilenet_plan",
    "network_symmetry_penalty",
    "symmetrize_params",
]
