"""The plain baseline of DiracNets Table 2 / fig. 1: DiracNet-28-10's layers without Dirac.

Same architecture and recipe as cifar_dirac.py; every block conv is a He-normal
`W` (`"plain"` variant), so the difference in accuracy is the parameterization's.
Deeper plain nets degrade (DiracNets sec. 3.1); try --config.model.depth=52.
"""

from dirac_jax.configs import cifar_dirac


def get_config():
    config = cifar_dirac.get_config()
    config.model.name = "plain"
    return config
