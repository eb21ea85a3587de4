"""The training config: its schema, its defaults (applied once) and its validation.

A config (`configs/*.py`) is an `ml_collections.ConfigDict`. `validate_config`
checks it in plain Python, before any data loading or compilation, and returns
it completed from `CONFIG_DEFAULTS`, the one table of optional fields and their
defaults; everything downstream reads the completed config's fields directly.
`create_model` builds the network a config names, and the name tuples here
(`CHAIN_MODELS`, `FOLDABLE_MODELS`, the schedule and weight-decay choices) are
the lowest place the trainer, `evaluate` and `export` share them from.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import ml_collections

from dirac_jax import data, models

__all__ = [
    "CHAIN_MODELS",
    "CONFIG_DEFAULTS",
    "ConfigError",
    "FOLDABLE_MODELS",
    "FOLD_CHECK_IMAGES",
    "LR_SCHEDULES",
    "RESUMABLE_FIELDS",
    "WEIGHT_DECAY_SCOPES",
    "create_model",
    "default_num_classes",
    "flatten",
    "to_json",
    "total_steps",
    "validate_config",
    "with_defaults",
]


# Chains fold whole (`fold.fold`); residual nets fold their kernels (`fold.fold_kernels`):
# each model class says which (`models.FOLDS`).
#: Model names whose nets fold whole into a conv-ReLU chain (`fold.fold`), as `export` writes them.
CHAIN_MODELS = tuple(n for n in models.MODEL_NAMES if models.FOLDS[n] == "chain")
#: Model names that fold at all (chain or kernels, `models.FOLDS`); `export` refuses the others.
FOLDABLE_MODELS = tuple(n for n in models.MODEL_NAMES if models.FOLDS[n] is not None)


# The fold check compares folded and unfolded logits on the first test images:
# a thousand images exercise every layer with real statistics at a small cost.
#: Default of `config.fold_check_images`, the number of test images the fold check compares.
FOLD_CHECK_IMAGES = 1024
#: The values `config.lr_schedule` may take; `validate_config` rejects any other.
LR_SCHEDULES = ("reference", "fractions")
#: The values `config.weight_decay_on` may take, to decay the kernels only or all parameters.
WEIGHT_DECAY_SCOPES = ("kernels", "all")

# Config fields a resumed run may change: they decide what is logged, evaluated, saved and
# how the input is read, never which steps are taken. A change to any other field (model,
# data, batch, seed, optimizer, schedule, steps, precision, ...) makes another run.
#: Config fields a resumed run may change; `train.train_and_evaluate` refuses other changes.
RESUMABLE_FIELDS = (
    "async_checkpointing",
    "checkpoint_every_steps",
    "dataset.data_dir",
    "dataset.num_workers",
    "eval_batch_size",
    "eval_every_steps",
    "fold_check_images",
    "keep_checkpoints",
    "log_every_steps",
)


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the fix."""


# Every optional field and its default: the one place defaults live. `validate_config`
# returns the config completed from this table, so the rest of the trainer reads
# `config.FIELD` directly. Required fields (no default): model.name, dataset.name,
# batch_size, num_epochs, num_train_steps, learning_rate, weight_decay, seed,
# checkpoint_every_steps, half_precision.
#: Every optional config field and its default; `validate_config` fills missing fields from it.
CONFIG_DEFAULTS = {
    "dataset": {
        "source": "auto",
        "data_dir": None,
        "image_size": 224,  # streamed datasets: the train and eval crop
        "num_workers": 0,  # streamed datasets: Grain worker processes per host
    },
    "eval_batch_size": None,  # None: batch_size
    "lr_boundaries": (),
    "lr_decay": 1.0,
    "lr_schedule": "reference",  # or "fractions" (`lr_boundary_steps`)
    "momentum": 0.9,
    "weight_decay_on": "kernels",  # or "all" (`weight_decay_mask`)
    "max_norm": 0.0,
    "symmetry_penalty": 0.0,  # lambda of the soft symmetry constraint; 0: off
    "symmetry_penalty_p": 1.0,  # its norm p >= 1 (the slides' L1)
    "fold_check_images": FOLD_CHECK_IMAGES,
    "augment": True,
    "log_every_steps": 100,
    "eval_every_steps": -1,
    "keep_checkpoints": 3,
    "async_checkpointing": True,
}


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with every missing or None field of `CONFIG_DEFAULTS` filled in.

    `validate_config` applies it; call it directly to use a partial config with
    `optim` or `steps` without the device checks of validation.
    """

    def fill(target, defaults):
        for name, default in defaults.items():
            if isinstance(default, dict):
                if target.get(name) is None:
                    target[name] = ml_collections.ConfigDict()
                fill(target[name], default)
            elif target.get(name) is None:
                target[name] = default

    config = ml_collections.ConfigDict(config.to_dict())
    fill(config, CONFIG_DEFAULTS)
    if config.eval_batch_size is None:
        config.eval_batch_size = config.get("batch_size")
    return config


def default_num_classes(config) -> int:
    """The classes of the config's small dataset; 1000 for a streamed one.

    Streamed datasets count their classes from the data at training time; any
    count builds the model for validation or for the symmetry penalty.
    """
    return data.NUM_CLASSES.get(config.dataset.name, 1000)


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks a config in plain Python, before any data loading or compilation.

    Builds the model (no parameters), which validates depth, width and the
    model's own fields. `train_and_evaluate` calls it once, first.

    Args:
      config: a training config (see `configs/`).

    Returns:
      A copy of `config` with the optional fields it omits set to their
      `CONFIG_DEFAULTS`.

    Raises:
      ConfigError: the first problem found, naming the field and the fix: an
        unknown model or dataset, a bad depth or width, a batch size not
        divisible by the number of devices, a bad schedule, and so on.
    """

    def fail(message):
        raise ConfigError(message)

    config = with_defaults(config)
    name, source = config.dataset.name, config.dataset.source
    streamed = data.STREAMED_DATASETS
    if name not in streamed and name not in data.DATASETS:
        fail(
            f"unknown dataset {name!r} (config.dataset.name); expected one of "
            f"{(*data.DATASETS, *streamed)}."
        )
    if name in streamed and source not in data.STREAM_SOURCES:
        fail(
            f"dataset {name} is streamed from config.dataset.source 'folder' (an image tree) "
            f"or 'tfds' (ArrayRecord), got {source!r}."
        )
    if name not in streamed and source not in data.SOURCES:
        fail(
            f"unknown dataset source {source!r} (config.dataset.source); expected one of "
            f"{data.SOURCES}."
        )
    image_size = config.dataset.image_size
    if not (isinstance(image_size, int) and image_size >= 8):
        fail(f"config.dataset.image_size must be an int >= 8, got {image_size!r}.")
    workers = config.dataset.num_workers
    if not (isinstance(workers, int) and workers >= 0):
        fail(f"config.dataset.num_workers must be an int >= 0, got {workers!r}.")
    if config.model.name not in models.MODEL_NAMES:
        fail(
            f"unknown model {config.model.name!r} (config.model.name); expected one of "
            f"{models.MODEL_NAMES}."
        )
    try:
        model = create_model(config, default_num_classes(config))
    except ValueError as e:
        fail(f"bad model config (config.model): {e}")

    devices = jax.device_count()
    for field in ("batch_size", "eval_batch_size"):
        size = config[field]
        if not (isinstance(size, int) and size >= 1):
            fail(f"config.{field} must be a positive int, got {size!r}.")
        if size % devices:
            fail(
                f"config.{field}={size} is not divisible by the {devices} devices "
                f"(jax.device_count()={devices}); use a multiple of {devices}."
            )
    steps, epochs = config.num_train_steps, config.num_epochs
    if not (isinstance(steps, int) and (steps >= 1 or steps == -1)):
        fail(
            f"config.num_train_steps must be a step count >= 1, or -1 to train "
            f"config.num_epochs epochs; got {steps!r}."
        )
    if not (isinstance(epochs, int | float) and epochs >= 0):
        fail(f"config.num_epochs must be a number >= 0, got {epochs!r}.")
    if steps == -1 and epochs <= 0:
        fail("set config.num_epochs > 0, or config.num_train_steps > 0 to override it.")
    if not (math.isfinite(config.learning_rate) and config.learning_rate > 0):
        fail(f"config.learning_rate must be a finite number > 0, got {config.learning_rate!r}.")
    if not config.weight_decay >= 0:
        fail(f"config.weight_decay must be >= 0, got {config.weight_decay!r}.")
    if not 0 <= config.momentum < 1:
        fail(f"config.momentum must be in [0, 1), got {config.momentum!r}.")
    boundaries = tuple(config.lr_boundaries)
    if any(not 0 < b < 1 for b in boundaries) or list(boundaries) != sorted(boundaries):
        fail(
            f"config.lr_boundaries must be increasing fractions of training in (0, 1), "
            f"got {boundaries}."
        )
    if config.lr_schedule not in LR_SCHEDULES:
        fail(f"config.lr_schedule must be one of {LR_SCHEDULES}, got {config.lr_schedule!r}.")
    if config.weight_decay_on not in WEIGHT_DECAY_SCOPES:
        fail(
            f"config.weight_decay_on must be one of {WEIGHT_DECAY_SCOPES}, got "
            f"{config.weight_decay_on!r}."
        )
    if not config.lr_decay > 0:
        fail(f"config.lr_decay must be > 0, got {config.lr_decay!r}.")
    if not config.max_norm >= 0:
        fail(f"config.max_norm must be >= 0 (0 disables it), got {config.max_norm!r}.")
    _validate_symmetry(config, model, fail)
    if not config.checkpoint_every_steps >= 0:
        fail(
            f"config.checkpoint_every_steps must be >= 0 (0: only at the end), got "
            f"{config.checkpoint_every_steps!r}."
        )
    if not config.keep_checkpoints >= 1:
        fail(f"config.keep_checkpoints must be >= 1, got {config.keep_checkpoints!r}.")
    if not config.log_every_steps >= 1:
        fail(f"config.log_every_steps must be >= 1, got {config.log_every_steps!r}.")
    return config


def _validate_symmetry(config, model, fail) -> None:
    lam, p = config.symmetry_penalty, config.symmetry_penalty_p
    if not (isinstance(lam, int | float) and math.isfinite(lam) and lam >= 0):
        fail(f"config.symmetry_penalty must be a finite number >= 0 (0: off), got {lam!r}.")
    if not (isinstance(p, int | float) and p >= 1):
        fail(f"config.symmetry_penalty_p must be a number >= 1 (1: the slides' L1), got {p!r}.")
    hard = getattr(model, "symmetry", None)
    if lam > 0 and not hasattr(model, "symmetric_layers"):
        fail(
            f"config.symmetry_penalty={lam} needs a model with symmetric layers ('wrn', 'resnet' "
            f"or 'mobilenet'); {config.model.name!r} has none."
        )
    if lam > 0 and hard is not None:
        fail(
            f"config.symmetry_penalty={lam} with config.model.symmetry={hard!r}: hard symmetric "
            "kernels make the penalty zero. Soft: set config.model.symmetry=None; hard: set "
            "config.symmetry_penalty=0."
        )
    if hard is not None and config.max_norm > 0:
        fail(
            f"config.max_norm={config.max_norm} projects kernels filter by filter, which the raw "
            f"numbers of config.model.symmetry={hard!r} kernels are not; set config.max_norm=0."
        )


def create_model(config, num_classes: int):
    """The model of `config.model`: its fields other than `name` go to `models.get_model`.

    `config.half_precision` computes in bfloat16 (parameters stay float32).
    """
    kwargs = {k: v for k, v in config.model.items() if k != "name"}
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    return models.get_model(config.model.name, num_classes=num_classes, dtype=dtype, **kwargs)


def total_steps(config, steps_per_epoch: int) -> int:
    """`config.num_train_steps`, or `num_epochs * steps_per_epoch` when it is -1."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(config.num_epochs * steps_per_epoch)


def to_json(config) -> str:
    """The config as the sorted, indented JSON a run records (`workdir.CONFIG_FILE`)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def flatten(tree: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
