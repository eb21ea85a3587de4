r"""ResNet on ImageNet with the slides' symmetric kernels, hard or soft (their ImageNet table).

  python -m dirac_jax.main --config=configs/imagenet_resnet_symmetric.py \
      --config.dataset.data_dir=TFDS_DIR [--config.model.depth=50]
  python -m dirac_jax.main --config=configs/imagenet_resnet_symmetric.py:soft ...
  python -m dirac_jax.main --config=configs/imagenet_resnet_symmetric.py:none ...

Triangular symmetry over channels on the second conv of every residual block
(`dirac_jax.models`): ResNet-18 8.6M parameters instead of 11.7M, ResNet-50
19.9M instead of 25.6M (the slides: 8.6M and 20.0M). For MobileNet v1 (4.2M;
3.0M triangular) derive a config from this one with `del config.model["depth"]`
and `config.model.name = "mobilenet"`. `soft` keeps the kernels unconstrained and adds
`symmetry_penalty * sum ||W - W^T||_1` (slides eq. 3; lambda = 1e-4 is our
default, not the slides') to the loss; evaluations also report the symmetrized
net. The recipe is imagenet_resnet.py's.
"""

from dirac_jax.configs import imagenet_resnet

MODES = ("hard", "soft", "none")


def get_config(mode: str = "hard"):
    if mode not in MODES:
        raise ValueError(
            f"imagenet_resnet_symmetric: unknown mode {mode!r}; expected one of {MODES}."
        )
    config = imagenet_resnet.get_config()
    config.model.symmetry = "triangular" if mode == "hard" else None  # a param.SYMMETRIC_KINDS
    config.model.symmetry_axis = "channel"  # channel | spatial | both
    config.symmetry_penalty = 1e-4 if mode == "soft" else 0.0  # lambda of slides eq. 3
    return config
