"""WRN-28-10 on CIFAR-10, the residual reference of DiracNets Table 2 (4.00% error).

Pre-activation WRN (Zagoruyko & Komodakis, 2016), 36.5M parameters, trained with
the same recipe as cifar_dirac.py (the WRN paper's: lr 0.1, x0.2 at 60/120/160,
wd 5e-4, 200 epochs, no dropout here). WRNs have no Dirac scales and do not
fold, so summary.json has fold_max_abs_error null and no dirac_scales.png.
"""

from dirac_jax.configs import cifar_dirac


def get_config():
    config = cifar_dirac.get_config()
    config.model.name = "wrn"
    config.model.depth = 28
    config.model.width = 10.0
    return config
