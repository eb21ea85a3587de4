"""Which convs of a network carry a symmetric kernel, and the soft constraint on those convs.

The slides (S. Zagoruyko, talk slides, Dec. 26, 2017) make conv kernels
symmetric (`dirac_jax.param.symmetric`): hard, built symmetric by the
transform, or soft, an unconstrained kernel plus the penalty of slides eq. 3,
projected with `param.symmetrize` at test time. A channel square needs
`in == out`, so a network can only carry it on its square convs. The rule here
picks one conv per building block, the one that maps the block's width to
itself:

* WRN and ResNet: the second conv of every residual branch, `conv1` (the
  second 3x3 of a basic block; the 3x3 of a bottleneck). The first 3x3 of a
  basic block changes the width in the first block of a group, and the 1x1s
  of a bottleneck change it always, so they stay unconstrained.
* MobileNet (v1): with `axis="channel"`, every pointwise (1x1) conv with
  `in == out`; with `"spatial"`, every depthwise 3x3 (each channel's 3x3
  filter); with `"both"`, both sets, each on its own square.

With triangular symmetry this rule reproduces the slides' ImageNet table (1000
classes, 224 px; a symmetric square trains `n(n+1)/2` numbers instead of `n^2`):

=============  =============  ==============  ===================  =====================
model          slides         ours            slides, triangular   ours, triangular
=============  =============  ==============  ===================  =====================
ResNet-18      11.8M          11,689,512      8.6M                 8,564,712
ResNet-50      25.6M          25,557,032      20.0M                19,915,400
MobileNet      4.2M           4,231,976       3.0M                 3,013,352
ResNet-101     44.7M          44,549,160      --                   33,913,608
=============  =============  ==============  ===================  =====================

Our unconstrained counts are torchvision's (ResNet) and the standard MobileNet
v1's; the slides' ResNet-18 and ResNet-101 figures are 0.11M and 0.15M above
them, and the triangular ResNet-50 is 19.9M against the slides' 20.0M (85k
fewer). The savings match the slides' to their rounding: 3.12M (slides 3.2M)
for ResNet-18, 5.64M (5.6M) for ResNet-50, 1.22M (1.2M) for MobileNet.
Triangularizing every square conv instead (also the first 3x3 of the basic
blocks that keep the width) would give ResNet-18 7.0M, not 8.6M.

The soft constraint uses the same convs and the same axis, so the projected
net of a soft run has the structure of the hard one. It acts on the conv's raw
`w`: that is the kernel for He-normal convs, and for `I + W` convs
(`dirac_init_sigma`) the identity is symmetric on every axis, so the penalty
and the projection of `I + W` are those of `W`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from dirac_jax import param
from dirac_jax.layers import KernelFactory

__all__ = [
    "SYMMETRY_AXES",
    "SymmetricLayers",
    "check_symmetry",
    "network_symmetry_penalty",
    "symmetric_factory",
    "symmetrize_params",
]

SYMMETRY_AXES = ("channel", "spatial", "both")

# A conv's module path in the params tree (e.g. ("group0_block1", "conv1")) -> its axis.
LayerMap = Mapping[tuple[str, ...], str]


@runtime_checkable
class SymmetricLayers(Protocol):
    """A model with convs that may carry a symmetric kernel (WRN, ResNet, MobileNet).

    `symmetry` is the hard kind (None: unconstrained kernels, which the soft
    penalty and `symmetrize_params` act on); `symmetric_layers()` names the
    convs by module path with their axis (module docstring).
    """

    symmetry: str | None

    def symmetric_layers(self) -> LayerMap:
        """`{module path: axis}` of the convs that carry the symmetry."""
        ...


def check_symmetry(kind, axis, dirac_init_sigma=None) -> None:
    """Validates a model's `symmetry` and `symmetry_axis` fields.

    Raises:
      ValueError: an unknown kind or axis, or symmetry together with
        `dirac_init_sigma` (an `I + W` kernel is not a `param.symmetric` one).
    """
    if kind is not None and kind not in param.SYMMETRIC_KINDS:
        raise ValueError(
            f"unknown symmetry {kind!r}; expected None or one of {param.SYMMETRIC_KINDS}."
        )
    if axis not in SYMMETRY_AXES:
        raise ValueError(f"unknown symmetry_axis {axis!r}; expected one of {SYMMETRY_AXES}.")
    if kind is not None and dirac_init_sigma is not None:
        raise ValueError(
            f"symmetry={kind!r} and dirac_init_sigma={dirac_init_sigma!r} both set the kernels; "
            "set one of them to None."
        )


def symmetric_factory(kind: str, axis: str) -> KernelFactory:
    """The kernel factory of a conv that carries the symmetry: `param.symmetric`."""
    return functools.partial(param.symmetric, kind=kind, axis=axis)


def _layer(params, path: tuple[str, ...]):
    for name in path:
        params = params[name]
    return params


def _soft_layers(model, what: str) -> LayerMap:
    if not isinstance(model, SymmetricLayers):
        raise ValueError(
            f"{what}: {type(model).__name__} has no symmetric layers; use a 'wrn', 'resnet' "
            "or 'mobilenet' model."
        )
    if model.symmetry is not None:
        raise ValueError(
            f"{what}: the model's kernels are symmetric by construction "
            f"(symmetry={model.symmetry!r}); the soft constraint is for symmetry=None."
        )
    return model.symmetric_layers()


def network_symmetry_penalty(model, params, p: float = 1) -> jax.Array:
    """The soft constraint of slides eq. 3 summed over the network's symmetric convs.

    `sum_layers param.symmetry_penalty(w, p, axis)` (one kernel's penalty), with
    the convs and axes of `model.symmetric_layers()` (module docstring). Multiply
    by `lambda` and add it to the loss (`config.symmetry_penalty`,
    `dirac_jax.steps`).

    Args:
      model: a `WideResNet`, `ResNet` or `MobileNet` with `symmetry=None`.
      params: its params pytree.
      p: the norm, `>= 1` (the slides use 1).

    Returns:
      A float32 scalar, zero exactly when every such kernel is symmetric.

    Raises:
      ValueError: a model without symmetric layers, or one with hard symmetry.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from dirac_jax.models import get_model, network_symmetry_penalty, symmetrize_params
      >>> model = get_model("wrn", depth=10, width=0.25)
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
      >>> bool(network_symmetry_penalty(model, params) > 0)
      True
      >>> float(network_symmetry_penalty(model, symmetrize_params(model, params)))
      0.0
    """
    total = jnp.zeros((), jnp.float32)
    for path, axis in _soft_layers(model, "network_symmetry_penalty").items():
        w = _layer(params, path)["w"]
        total = total + param.symmetry_penalty(w, p, axis=axis).astype(jnp.float32)
    return total


def symmetrize_params(model, params):
    """`params` with the kernel of each of the model's symmetric convs projected by `symmetrize`.

    The test-time projection of the soft constraint, as in the slides: the
    upper triangle of each square replaces the lower one. Other leaves are
    returned as they are.

    Args:
      model: a `WideResNet`, `ResNet` or `MobileNet` with `symmetry=None`.
      params: its params pytree (nested dicts).

    Returns:
      A new params pytree.

    Raises:
      ValueError: a model without symmetric layers, or one with hard symmetry.
    """
    layers = _soft_layers(model, "symmetrize_params")

    def project(tree, prefix):
        out = {}
        for name, sub in tree.items():
            path = (*prefix, name)
            if path in layers:
                out[name] = {**sub, "w": param.symmetrize(sub["w"], layers[path])}
            elif isinstance(sub, Mapping):
                out[name] = project(sub, path)
            else:
                out[name] = sub
        return out

    return project(params, ())
