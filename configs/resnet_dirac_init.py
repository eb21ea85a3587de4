"""Dirac parameterization as ResNet initialization, DiracNets sec. 3.4, on CIFAR-10.

Every conv of a WRN-28-10 (stem, residual branches, 1x1 projections) is
`W_hat = I + W` (sec. 3.4 eq. 8), and all weights, the classifier's included,
are drawn from `N(0, sigma^2)`, ignoring filter shapes, as the paper says. The
paper finds the same accuracy for sigma from 1e-8 up to about 0.1 and slightly
worse near 1; vary --config.model.dirac_init_sigma to reproduce that. For
ResNet-18 on ImageNet use imagenet_resnet.py with a model.dirac_init_sigma field.
"""

from dirac_jax.configs import cifar_wrn


def get_config():
    config = cifar_wrn.get_config()
    config.model.dirac_init_sigma = 1e-3  # the std of W in I + W
    return config
