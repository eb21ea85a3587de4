"""Dirac parameterization as ResNet initialization, DiracNets sec. 3.4, on CIFAR-10.

The 3x3 convs of every residual branch of a WRN-28-10 are `W_hat = I + W` with
`W ~ N(0, sigma^2)` for all weights, ignoring filter shapes (sec. 3.4 eq. 8). The
paper finds the same accuracy for sigma from 1e-8 up to about 0.1 and slightly
worse near 1; vary --config.model.dirac_init_sigma to reproduce that. For
ResNet-18 on ImageNet use imagenet_resnet.py with a model.dirac_init_sigma field.
"""

from configs import cifar_wrn


def get_config():
    config = cifar_wrn.get_config()
    config.model.dirac_init_sigma = 1e-3  # the std of W in I + W
    return config
