"""The PlainNet recipe of Oyedotun et al. on CIFAR-10.

A 50-layer plain net (their Table 2: 0.72M params, 6.65% error; ours has
0.76M at width 1) of `conv -> BN -> LeakyReLU(0.1)` layers with
`U[-sqrt(6/n_in), sqrt(6/n_in)]` init (eqs. 1, 3), and the max-norm constraint
`||w_j|| <= c` (eq. 2) applied as a projection of every conv and linear kernel
after each SGD step. The slides give no value of c; we use c = 4, within the 3-4
range usual for max-norm (Srivastava et al., 2014). The uniform init gives
filters of norm about sqrt(2), so the constraint only acts on filters that grow.
The optimizer recipe is cifar_dirac.py's.
"""

from dirac_jax.configs import cifar_dirac


def get_config():
    config = cifar_dirac.get_config()
    config.model.name = "plainnet"
    config.model.depth = 50  # conv layers + classifier; any depth >= 5 (100 and beyond)
    config.model.width = 1.0
    config.model.leaky_slope = 0.1  # beta of eq. 1
    config.max_norm = 4.0  # c of eq. 2
    return config
