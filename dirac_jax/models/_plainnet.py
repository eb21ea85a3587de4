"""PlainNet: the very deep plain net recipe of Oyedotun et al.

Every layer is `conv(W) -> BN -> LeakyReLU` (their eq. 1) with `W` drawn from
`U[-sqrt(6/n_in), sqrt(6/n_in)]` (eq. 3). The max-norm constraint
`||w_j|| <= c` (eq. 2) is a projection after each optimizer step, so it lives in
the trainer (`config.max_norm`), which applies `param.max_norm` to every kernel.

Their ablation (Table 1) removes components: `batch_norm=False` drops BN (the
convs then get a bias), `leaky_slope=0.0` is plain ReLU, and `kernel_init`
swaps the uniform draw for He-normal.

Layout (a choice of this library; the slides give only the depth): a 3x3 stem
of `16k` channels, then `depth - 2` conv layers split as evenly as possible
over three groups of widths `16k, 32k, 64k` (earlier groups take the extra
layers) with a 2x2 max-pool between groups, then global average pooling and the
classifier. `depth` counts the conv layers plus the classifier, so any
`depth >= 5` works, 100 and beyond included.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dirac_jax.models._diracnet import GROUP_BASES, check_width
from dirac_jax.models._layers import (
    ParamConv,
    batch_norm,
    global_avg_pool,
    kernel_factory,
    max_pool,
)


def plainnet_layers(depth: int) -> tuple[int, int, int]:
    """Conv layers per group for a PlainNet of `depth`; raises for `depth < 5`."""
    if not (isinstance(depth, int) and depth >= 5):
        raise ValueError(f"depth {depth!r} is not valid for PlainNet: it must be an int >= 5.")
    q, r = divmod(depth - 2, 3)
    return tuple(q + (g < r) for g in range(3))


class PlainNet(nn.Module):
    """BN + Leaky ReLU + uniform init plain net for 32x32 inputs (Oyedotun et al.).

    Attributes:
      depth: conv layers + 1 (the classifier), `>= 5`.
      width: width multiplier `k`.
      num_classes: classifier outputs.
      leaky_slope: the `beta` of Leaky ReLU (eq. 1); 0 is ReLU.
      batch_norm: BN after every conv; without it the convs have a bias.
      kernel_init: `"uniform"` (eq. 3) or `"he_normal"`.
      dtype: computation dtype.
    """

    depth: int = 50
    width: float = 1
    num_classes: int = 10
    leaky_slope: float = 0.1
    batch_norm: bool = True
    kernel_init: str = "uniform"
    dtype: Any = jnp.float32

    # No fold: `dirac_jax.fold` has none written for its `conv -> BN -> LeakyReLU` layers.
    folds = None

    def plan(self) -> tuple[tuple[int, ...], list[int]]:
        """`(layers per group, group widths)`; validates the attributes."""
        widths = [check_width(self.width, b) for b in GROUP_BASES["cifar"]]
        if self.kernel_init not in ("uniform", "he_normal"):
            raise ValueError(
                f"kernel_init must be 'uniform' or 'he_normal', got {self.kernel_init!r}."
            )
        if not 0 <= self.leaky_slope < 1:
            raise ValueError(f"leaky_slope must be in [0, 1), got {self.leaky_slope!r}.")
        return plainnet_layers(self.depth), widths

    @nn.compact
    def __call__(self, x, train: bool = False):
        counts, widths = self.plan()
        factory = kernel_factory("uniform" if self.kernel_init == "uniform" else "plain")

        def layer(x, features, name):
            x = ParamConv(
                features,
                (3, 3),
                factory,
                use_bias=not self.batch_norm,
                dtype=self.dtype,
                name=name,
            )(x)
            if self.batch_norm:
                x = batch_norm(train, self.dtype, name=f"{name}_bn")(x)
            return nn.leaky_relu(x, self.leaky_slope)

        x = layer(x, widths[0], "conv")
        for g, (w, count) in enumerate(zip(widths, counts, strict=True)):
            if g:
                x = max_pool(x, 2, 2)
            for i in range(count):
                x = layer(x, w, f"group{g}_conv{i}")
        x = global_avg_pool(x)
        fc = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            name="fc",
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "uniform"),
        )
        return fc(x).astype(jnp.promote_types(self.dtype, jnp.float32))
