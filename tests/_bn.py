"""Non-trivial BN statistics for fold and export tests: a fold that dropped them would show."""

import jax
import jax.numpy as jnp
import numpy as np


def random_bn_stats(batch_stats, seed: int = 0):
    """`batch_stats` with every variance drawn from U(0.5, 2) and every mean from N(0, 0.3^2)."""
    rng = np.random.default_rng(seed)

    def draw(path, a):
        if path[-1].key == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32)
        return jnp.asarray(0.3 * rng.standard_normal(a.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, batch_stats)
