"""Shared by the trainer tests: `tiny_config` and `use_compilation_cache`.

(Multi-process runs are started through `python -m dirac_jax.main --coordinator_address=...`
now, see test_train.py; the name stays for the imports of the other test modules.)
"""

import os
import tempfile

import ml_collections

# A JAX persistent compilation cache for the test processes (in-process and subprocess
# runs compile the same tiny programs many times; a hit turns seconds into milliseconds).
COMPILATION_CACHE = os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"dirac_jax_tests_jax_cache_{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def use_compilation_cache():
    """Turns the cache on in this process (a no-op if it compiled anything before)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", COMPILATION_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def tiny_config(num_steps: int) -> ml_collections.ConfigDict:
    """A DiracNet-10-0.25 on synthetic CIFAR-10, logging every step (shared with the test)."""
    from dirac_jax.configs import cifar_dirac

    config = cifar_dirac.get_config()
    config.model.depth = 10
    config.model.width = 0.25
    config.dataset.source = "synthetic"
    config.batch_size = 16
    config.eval_batch_size = 128
    config.num_train_steps = num_steps
    config.log_every_steps = 1
    config.eval_every_steps = num_steps
    config.checkpoint_every_steps = 0
    return config
