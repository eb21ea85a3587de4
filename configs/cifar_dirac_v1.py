"""DiracNet v1 (the first arXiv version) on CIFAR-10: DiracNet-34-8, v1 Table 2 (4.54% error).

v1 blocks are `NCReLU -> conv(a delta + b W_norm) -> BN` with scalar `a` (init 5)
and `b` (init 1e-3) per layer (DiracNets v1 eqs. 4, 9); NCReLU doubles the
input channels. Unlike v2, the v1 recipe (the v1 paper and the reference v1
code) weight-decays every parameter, `a`, `b`, BN and biases included
(`weight_decay_on="all"`), and draws the raw conv weights from N(0, 0.1^2)
(`param.dirac_v1`). DiracNet-34-2 (3.7M params) is a cheaper v1 point:
--config.model.width=2.
"""

from dirac_jax.configs import cifar_dirac


def get_config():
    config = cifar_dirac.get_config()
    config.model.name = "diracnet_v1"
    config.model.depth = 34
    config.model.width = 8.0
    config.weight_decay_on = "all"
    return config
