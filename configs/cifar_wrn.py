"""WRN-28-10 on CIFAR-10, the residual reference of DiracNets Table 2 (4.00% error).

Pre-activation WRN (Zagoruyko & Komodakis, 2016), 36.5M parameters, trained with
the same recipe as cifar_dirac.py (the WRN paper's: lr 0.1, x0.2 at 60/120/160,
wd 5e-4, 200 epochs, no dropout here). WRNs have no Dirac scales, so no
dirac_scales.png; they keep their shortcuts, so the fold check measures their
kernels folded (`fold.fold_kernels`).
"""

from dirac_jax.configs import cifar_dirac


def get_config():
    config = cifar_dirac.get_config()
    config.model.name = "wrn"  # WRN-28-10: cifar_dirac's depth and width
    return config
