"""Every shipped config starts: `configs/*.py` at its own defaults, tiny, for a few steps.

Only what makes a run small changes (model width, batch sizes, steps, the streamed crop
size, and at least two Grain worker processes where the data is streamed), and the data
comes from here (synthetic CIFAR, Debian's Fashion-MNIST, a JPEG tree in the ImageNet
layout). So a default that cannot start, such as a worker count the input pipeline cannot
place, fails here before it ships.
"""

import json
import math
import pathlib

import _multihost_worker
import pytest

from dirac_jax import config_schema, data, train, workdir
from dirac_jax.reproduce import load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
_multihost_worker.use_compilation_cache()
NUM_STEPS = 3


def _tiny(config, image_tree) -> set[str]:
    """Shrinks `config` in place; returns the fields it changed."""
    streamed = config.dataset.name in data.STREAMED_DATASETS
    config.model.width = 0.125 if streamed else 0.25
    config.num_train_steps = NUM_STEPS
    changed = {"model.width", "num_train_steps", "batch_size", "eval_batch_size"}
    if streamed:
        config.dataset.source, config.dataset.data_dir = "folder", str(image_tree)
        config.dataset.image_size, config.dataset.num_workers = 32, 2
        config.batch_size, config.eval_batch_size = 8, 16
        changed |= {"dataset.source", "dataset.data_dir", "dataset.image_size"}
        changed |= {"dataset.num_workers"}
    else:
        config.batch_size, config.eval_batch_size = 16, 512
        if config.dataset.name != "fashion_mnist":  # the only dataset installed here
            config.dataset.source = "synthetic"
            changed.add("dataset.source")
    return changed


def test_every_config_file_is_tested():
    assert len(CONFIGS) >= 12 and "imagenet_dirac" in CONFIGS


def test_configs_take_the_variants_their_package_docstring_names():
    # dirac_jax.configs' docstring says every get_config() takes no argument but these two.
    import importlib
    import inspect

    import ml_collections

    import dirac_jax.configs

    with_variant = set()
    for name in CONFIGS:
        get_config = importlib.import_module(f"dirac_jax.configs.{name}").get_config
        if inspect.signature(get_config).parameters:
            with_variant.add(name)
            for mode in ("hard", "soft", "none"):
                assert isinstance(get_config(mode), ml_collections.ConfigDict), (name, mode)
            with pytest.raises(ValueError, match="unknown mode"):
                get_config("other")
        assert isinstance(get_config(), ml_collections.ConfigDict), name
    assert with_variant == {"cifar_wrn_symmetric", "imagenet_resnet_symmetric"}
    assert all(f"`{name}`" in dirac_jax.configs.__doc__ for name in with_variant)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_config_starts_at_its_defaults(name, image_tree, tmp_path):
    defaults = load_config(ROOT / "configs" / f"{name}.py")
    config = load_config(ROOT / "configs" / f"{name}.py")
    changed = _tiny(config, image_tree)
    summary = train.train_and_evaluate(config, tmp_path)
    assert summary["step"] == NUM_STEPS and math.isfinite(summary["test_loss"]), summary
    # The run used the file's defaults in every other field (config.json is what ran).
    recorded = config_schema.flatten(json.loads((tmp_path / workdir.CONFIG_FILE).read_text()))
    expected = config_schema.flatten(
        json.loads(config_schema.to_json(config_schema.validate_config(defaults)))
    )
    differ = {k for k in expected if recorded.get(k) != expected[k]}
    assert differ <= changed, differ - changed
