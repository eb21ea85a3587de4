"""ResNet-18 on ImageNet, the residual reference of DiracNets Table 3.

Torchvision-equivalent ResNet-18 (11.7M params; --config.model.depth=34 for
ResNet-34) with the recipe of imagenet_dirac.py. ResNets keep their shortcuts:
the fold check measures their kernels folded (`fold.fold_kernels`).
"""

from dirac_jax.configs import imagenet_dirac


def get_config():
    config = imagenet_dirac.get_config()
    del config.model["stem"]  # ResNet has one stem; the field is DiracNet's
    config.model.name = "resnet"  # ResNet-18: imagenet_dirac's depth and width
    return config
