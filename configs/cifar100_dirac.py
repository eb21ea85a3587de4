"""DiracNet-28-10 on CIFAR-100 (DiracNets Table 2: 21.54% error).

Same recipe as cifar_dirac.py; the data is the CIFAR-100 python archive
(`cifar-100-python.tar.gz` in --config.dataset.data_dir), normalized with the
CIFAR-10 statistics as the reference code does.
"""

from dirac_jax.configs import cifar_dirac


def get_config():
    config = cifar_dirac.get_config()
    config.dataset.name = "cifar100"
    return config
