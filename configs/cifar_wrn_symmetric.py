r"""WRN on CIFAR-10 with the slides' symmetric kernels, hard or soft (the slides' CIFAR figure).

  python -m dirac_jax.main --config=configs/cifar_wrn_symmetric.py        # hard (default)
  python -m dirac_jax.main --config=configs/cifar_wrn_symmetric.py:soft   # soft penalty
  python -m dirac_jax.main --config=configs/cifar_wrn_symmetric.py:none   # unconstrained
      [--config.model.block=bottleneck --config.model.depth=29]
      [--config.model.symmetry=eigen] [--config.model.symmetry_axis=spatial]

The slides compare WRN with basic and with bottleneck blocks, with and without
symmetric kernels. The second conv of every block (`conv1`, the width-preserving
one) carries the symmetry (`dirac_jax.models`): with `hard`, it is
`param.symmetric(kind=model.symmetry, axis=model.symmetry_axis)` (WRN-28-10
basic, triangular over channels: 26.8M parameters instead of 36.5M); with
`soft`, it is unconstrained and `symmetry_penalty * sum ||W - W^T||_1` (slides
eq. 3) joins the loss, and every evaluation also reports the net projected by
`param.symmetrize` (`test_top1_symmetrized`). lambda = 1e-4 is our default,
not a figure of the slides. Bottleneck WRNs take depths 9n+2, counting every
conv (29 = 3 blocks per group): the slides' "WRN-16-1-bottleneck", two blocks per
group with 219,482 parameters (172,106 triangular), is our depth 20, width 1.
The recipe is cifar_wrn.py's.
"""

from dirac_jax.configs import cifar_wrn

MODES = ("hard", "soft", "none")


def get_config(mode: str = "hard"):
    if mode not in MODES:
        raise ValueError(f"cifar_wrn_symmetric: unknown mode {mode!r}; expected one of {MODES}.")
    config = cifar_wrn.get_config()
    config.model.block = "basic"  # basic | bottleneck (depth 9n+2)
    config.model.symmetry = "triangular" if mode == "hard" else None  # a param.SYMMETRIC_KINDS
    config.model.symmetry_axis = "channel"  # channel | spatial | both
    config.symmetry_penalty = 1e-4 if mode == "soft" else 0.0  # lambda of slides eq. 3
    return config
