"""Training and evaluation: SGD with momentum on a data-parallel mesh, resumable.

The layout follows flax examples/imagenet: small top-level functions
(`create_learning_rate_fn`, `create_optimizer`, `create_train_state`,
`train_step`, `eval_step`) and one loop, `train_and_evaluate(config, workdir)`.

Parallelism is `jit` over a one-axis mesh `("data",)` of all devices: the global
batch is sharded on `"data"`, the parameters, optimizer state and BN statistics
are replicated, and XLA inserts the cross-device reductions. BatchNorm therefore
normalizes over the global batch with no `pmean`, and a step on 8 devices
computes what it computes on one.

The input comes from `dirac_jax.input_pipeline`. Small datasets live on the
devices as uint8 arrays, replicated; a step receives only the global batch's
indices and gathers, augments (key `fold_in(fold_in(key(seed), step), 0)`) and
normalizes inside the jitted step. ImageNet is streamed through Grain: each host
decodes and augments its rows of the global batch, the step normalizes. All
randomness is a function of `(config.seed, step)`, whatever the number of hosts,
so a run resumed from a checkpoint at step `k` (the streamed input's position is
saved with it) continues bit for bit as if it had never stopped.

Config defaults live in `CONFIG_DEFAULTS`; `validate_config` checks a config
and fills them in, once, at the start of `train_and_evaluate`.

Symmetric kernels (the slides) come two ways, on the convs that
`model.symmetric_layers()` names (WRN, ResNet, MobileNet). Hard:
`config.model.symmetry` builds their kernels symmetric. Soft: the model stays
unconstrained and `config.symmetry_penalty` (lambda) adds
`lambda * models.symmetry_penalty(model, params, p)` (slides eq. 3 over those
convs, on `config.model.symmetry_axis`) to the loss; every evaluation then
also reports the net with those kernels projected by `param.symmetrize`
(`test_accuracy_symmetrized`, ...), as the slides do at test time.

Recipe defaults follow the reference training code (where it differs from the
papers' prose, the prose's choice is a config option): SGD momentum 0.9 with
coupled weight decay on conv and linear kernels only (v2; the v1 recipe decays
every parameter, `weight_decay_on="all"`), step learning-rate decay placed as the
reference places it, with the momentum restarted at each decay
(`lr_schedule="reference"`; `"fractions"` keeps it).
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state as flax_train_state
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dirac_jax import _paths, checkpoint, data, input_pipeline, metrics, models, param
from dirac_jax.checkpoint import CheckpointError, NonFiniteLossError
from dirac_jax.input_pipeline import put_replicated, shard_batch

IMAGENET = "imagenet2012"
# Chains fold whole (`fold.fold`); residual nets fold their kernels (`fold.fold_kernels`).
CHAIN_MODELS = ("diracnet", "diracnet_v1", "plain", "mobilenet")
FOLDABLE_MODELS = (*CHAIN_MODELS, "wrn", "resnet")
# The fold check compares folded and unfolded logits on the first test images:
# a thousand images exercise every layer with real statistics at a small cost.
FOLD_CHECK_IMAGES = 1024
SUMMARY_FILE = "summary.json"
# Suffix of the eval metrics of the net projected by `param.symmetrize` (soft runs).
SYMMETRIZED = "_symmetrized"
CONFIG_FILE = "config.json"
_AUGMENT_STREAM = 0  # fold_in tag of the augmentation key, so other uses get other streams.

__all__ = [
    "CHAIN_MODELS",
    "CONFIG_DEFAULTS",
    "CheckpointError",
    "ConfigError",
    "FOLDABLE_MODELS",
    "NonFiniteLossError",
    "TrainState",
    "classification_metrics",
    "compile_steps",
    "create_learning_rate_fn",
    "create_model",
    "create_optimizer",
    "create_train_state",
    "lr_boundary_steps",
    "reset_at_steps",
    "cross_entropy_loss",
    "eval_step",
    "evaluate",
    "fold_max_abs_error",
    "make_mesh",
    "project_kernels",
    "put_replicated",
    "shard_batch",
    "total_steps",
    "train_and_evaluate",
    "train_step",
    "validate_config",
    "weight_decay_mask",
]

# Config fields a resumed run may change: they decide what is logged, evaluated, saved and
# how the input is read, never which steps are taken. A change to any other field (model,
# data, batch, seed, optimizer, schedule, steps, precision, ...) makes another run.
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
# Test hook: DIRAC_JAX_TEST_SIGTERM=STEP (or STEP:group) makes the trainer send SIGTERM to
# itself (to its process group) right after step STEP, so that preemption tests stop at a
# chosen step instead of after a sleep.
SIGTERM_TEST_ENV = "DIRAC_JAX_TEST_SIGTERM"


class ConfigError(ValueError):
    """A config that cannot run; the message names the field and the fix."""


class TrainState(flax_train_state.TrainState):
    """Flax's TrainState (step, params, opt_state) plus the BatchNorm statistics."""

    batch_stats: Any = None


# ---------------------------------------------------------------------------
# Config.


# Every optional field and its default: the one place defaults live. `validate_config`
# returns the config completed from this table, so the rest of the trainer reads
# `config.FIELD` directly. Required fields (no default): model.name, dataset.name,
# batch_size, num_epochs, num_train_steps, learning_rate, weight_decay, seed,
# checkpoint_every_steps, half_precision.
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


def _with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with every missing or None field of `CONFIG_DEFAULTS` filled in."""

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


def _num_classes_for_validation(config) -> int:
    # Streamed datasets count their classes from the data; any count validates the model.
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

    config = _with_defaults(config)
    name, source = config.dataset.name, config.dataset.source
    streamed = input_pipeline.STREAMED_DATASETS
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
        model = create_model(config, _num_classes_for_validation(config))
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
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
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


# ---------------------------------------------------------------------------
# Optimizer.


LR_SCHEDULES = ("reference", "fractions")
WEIGHT_DECAY_SCOPES = ("kernels", "all")


def lr_boundary_steps(config, steps_per_epoch: int) -> tuple[int, ...]:
    """The steps at which the learning rate is multiplied by `lr_decay`.

    `lr_boundaries` are fractions of training. With `lr_schedule="reference"`
    (the default) an epoch-counted run (`num_train_steps <= 0`) decays where the
    reference code does: its `epoch_step` list `[60, 120, 160]` is checked
    against the 1-based number of the epoch about to start, so the rate drops
    at the start of epoch 60, after 59 full epochs, i.e. at step
    `(round(f * num_epochs) - 1) * steps_per_epoch`. A run counted in steps
    (`num_train_steps > 0`, e.g. the quickstart) has no epochs to shift by and
    decays at `int(f * total_steps)`, which is also where
    `lr_schedule="fractions"` always decays (the paper's prose, "at epochs 60,
    120 and 160", read as after that many epochs).

    Examples:
      >>> import ml_collections
      >>> c = ml_collections.ConfigDict(dict(lr_boundaries=(0.3, 0.6, 0.8), num_epochs=200,
      ...     num_train_steps=-1, lr_schedule="reference"))
      >>> lr_boundary_steps(c, steps_per_epoch=10)
      (590, 1190, 1590)
      >>> c.lr_schedule = "fractions"
      >>> lr_boundary_steps(c, steps_per_epoch=10)
      (600, 1200, 1600)
    """
    config = _with_defaults(config)
    total = total_steps(config, steps_per_epoch)
    by_epochs = config.lr_schedule == "reference" and not config.num_train_steps > 0
    steps = []
    for fraction in config.lr_boundaries:
        if by_epochs:
            epoch = max(1, round(fraction * config.num_epochs))
            steps.append(max(1, (epoch - 1) * steps_per_epoch))
        else:
            steps.append(max(1, int(fraction * total)))
    return tuple(steps)


def create_learning_rate_fn(config, steps_per_epoch: int) -> optax.Schedule:
    """Step decay: `learning_rate` times `lr_decay` at each of `lr_boundary_steps`.

    Boundaries are fractions of the total number of steps (`total_steps`), so a
    shorter run set by `num_train_steps` decays at the same relative points. The
    CIFAR recipe is (0.3, 0.6, 0.8) x0.2, i.e. epochs 60/120/160 of 200; ImageNet
    (0.3, 0.6, 0.9) x0.1. The factor applies from the boundary step on.

    Examples:
      >>> import ml_collections
      >>> c = ml_collections.ConfigDict(dict(learning_rate=0.1, lr_boundaries=(0.3, 0.6, 0.8),
      ...     lr_decay=0.2, num_train_steps=100, num_epochs=0))
      >>> fn = create_learning_rate_fn(c, steps_per_epoch=10)
      >>> [round(float(fn(s)), 6) for s in (0, 29, 30, 60, 80, 99)]
      [0.1, 0.1, 0.02, 0.004, 0.0008, 0.0008]
    """
    config = _with_defaults(config)
    decay = float(config.lr_decay)
    scales: dict[int, float] = {}
    for boundary in lr_boundary_steps(config, steps_per_epoch):
        # Boundaries that coincide on a very short run compound instead of overwriting.
        scales[boundary] = scales.get(boundary, 1.0) * decay
    return optax.piecewise_constant_schedule(float(config.learning_rate), scales)


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def _is_kernel(path, leaf) -> bool:
    """Conv kernels (`w`, raw or Dirac's) and linear kernels (`kernel`)."""
    name = _leaf_name(path)
    return name == "kernel" or (name == "w" and np.ndim(leaf) > 1)


def _is_decayed(path, leaf) -> bool:
    """`_is_kernel`, and the raw numbers of symmetric kernels (`v`, `q`, `lambda`, ...).

    The reference decays every tensor of more than one dimension; in these
    models those are exactly the conv and linear weights, including every raw
    piece of a `param.symmetric` kernel (Dirac's `a`, `b` and BN's are vectors).
    """
    return _is_kernel(path, leaf) or np.ndim(leaf) > 1


def weight_decay_mask(params, scope: str = "kernels"):
    """True for the leaves weight decay applies to.

    `scope="kernels"`: conv and linear kernels only, as the reference v2 code
    (it decays tensors of more than one dimension) and DiracNets v2 sec. 2 (no
    weight decay on `a` and `b`); BN parameters and biases are not decayed.
    The raw numbers of a symmetric kernel (`param.symmetric`) are decayed.
    `scope="all"`: every parameter, as the reference v1 code (one SGD group
    with weight decay) and DiracNets v1, which decays the scalar `a` and `b`.

    Examples:
      >>> import numpy as np
      >>> p = {"conv": {"w": np.ones((3, 3, 2, 2)), "a": np.ones(2), "b": np.ones(2)},
      ...      "bn": {"scale": np.ones(2)}, "fc": {"kernel": np.ones((2, 3)), "bias": np.ones(3)}}
      >>> mask = weight_decay_mask(p)
      >>> mask["conv"], mask["bn"], mask["fc"]
      ({'a': False, 'b': False, 'w': True}, {'scale': False}, {'bias': False, 'kernel': True})
      >>> all(jax.tree.leaves(weight_decay_mask(p, "all")))
      True
    """
    if scope not in WEIGHT_DECAY_SCOPES:
        raise ValueError(f"unknown weight decay scope {scope!r}; expected {WEIGHT_DECAY_SCOPES}.")
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: scope == "all" or _is_decayed(path, leaf), params
    )


class ResetState(NamedTuple):
    count: jax.Array
    inner: optax.OptState


def reset_at_steps(inner: optax.GradientTransformation, steps) -> optax.GradientTransformation:
    """`inner` whose state is zeroed before the update of each step in `steps`.

    Around `optax.trace` this is the reference trainer's re-creation of
    `torch.optim.SGD` at every learning-rate boundary: the momentum buffer
    starts again from the first gradient after it.
    """
    steps = tuple(int(s) for s in steps)

    def init(params):
        return ResetState(jnp.zeros((), jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        reset = jnp.isin(state.count, jnp.asarray(steps, jnp.int32)) if steps else False
        inner_state = jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), state.inner)
        updates, inner_state = inner.update(updates, inner_state, params)
        return updates, ResetState(optax.safe_increment(state.count), inner_state)

    return optax.GradientTransformation(init, update)


def create_optimizer(
    config, learning_rate_fn: optax.Schedule, steps_per_epoch: int | None = None
) -> optax.GradientTransformation:
    """SGD with momentum and PyTorch-style (coupled) L2 weight decay, as the reference.

    `wd * w` joins the gradient before the momentum, as in
    `torch.optim.SGD(weight_decay=...)`; the buffer is `m <- momentum * m + g`
    and the step `-lr * m`. The decayed leaves are `weight_decay_mask` with
    `config.weight_decay_on`. With `lr_schedule="reference"` (and
    `steps_per_epoch` given) the momentum restarts at each learning-rate
    boundary, since the reference creates a new optimizer there.
    """
    config = _with_defaults(config)
    mask = functools.partial(weight_decay_mask, scope=str(config.weight_decay_on))
    momentum = optax.trace(decay=float(config.momentum))
    if config.lr_schedule == "reference" and steps_per_epoch:
        momentum = reset_at_steps(momentum, lr_boundary_steps(config, steps_per_epoch))
    return optax.chain(
        optax.add_decayed_weights(float(config.weight_decay), mask=mask),
        momentum,
        optax.scale_by_learning_rate(learning_rate_fn),
    )


def project_kernels(params, c: float):
    """PlainNet eq. 2: every conv and linear kernel's filters projected to norm <= c."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: param.max_norm(x, c) if _is_kernel(path, x) else x, params
    )


# ---------------------------------------------------------------------------
# State, steps, sharding.


def make_mesh(devices=None) -> Mesh:
    """A one-axis `("data",)` mesh over `devices` (default: all devices of all processes).

    `jax.make_mesh` orders the devices for the physical topology (on TPU pods the
    ring of the interconnect), so a host's devices need not be neighbours in the
    mesh; the input pipeline does not assume they are. The axis is `Auto`: the
    step is `jit` with explicit in/out shardings and XLA places the reductions
    (JAX's default, `Explicit`, would make sharding part of every array's type).
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def create_train_state(
    config,
    model,
    key: jax.Array,
    image_shape,
    learning_rate_fn: optax.Schedule,
    mesh=None,
    steps_per_epoch: int | None = None,
) -> TrainState:
    """Initializes parameters, BN statistics and optimizer state.

    Args:
      config: the training config (optimizer fields).
      model: from `create_model`.
      key: the init key (the trainer uses `jax.random.key(config.seed)`).
      image_shape: `(H, W, C)` of one input image.
      learning_rate_fn: from `create_learning_rate_fn`.
      mesh: if given, every array is created replicated on this mesh.
      steps_per_epoch: places the momentum restarts of `lr_schedule="reference"`
        (`create_optimizer`); None: no restarts.

    Returns:
      A `TrainState` at step 0.
    """
    tx = create_optimizer(config, learning_rate_fn, steps_per_epoch)

    def init(key):
        variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        params = variables["params"]
        return jnp.zeros((), jnp.int32), params, variables.get("batch_stats", {}), tx.init(params)

    out_shardings = None if mesh is None else _replicated(mesh)
    step, params, batch_stats, opt_state = jax.jit(init, out_shardings=out_shardings)(key)
    return TrainState(
        step=step,
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=opt_state,
        batch_stats=batch_stats,
    )


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def augment_key(seed: int, step: jax.Array) -> jax.Array:
    """The augmentation key of a step: a function of `(seed, step)` only."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), _AUGMENT_STREAM)


def preprocess(images, key, *, dataset_name: str, augment: bool):
    """uint8 images to normalized float32, with CIFAR augmentation if `augment`."""
    if augment:
        images = data.augment(key, images)
    return data.normalize(images, dataset_name)


def train_step(
    state: TrainState,
    batch: dict,
    *,
    learning_rate_fn: optax.Schedule,
    dataset_name: str,
    seed: int,
    augment: bool = True,
    max_norm: float = 0.0,
    symmetry_penalty: tuple[float, Callable] | None = None,
):
    """One SGD step on a global batch; run it under `jit` with the batch sharded.

    Args:
      state: the current state (replicated).
      batch: `{"image", "label"}`. uint8 images (small datasets) are augmented
        and normalized here, keyed by `(seed, state.step)`; float images
        (ImageNet) are used as they are.
      learning_rate_fn: only for logging the step's learning rate.
      dataset_name: selects the normalization statistics.
      seed: the run seed.
      augment: reflect-pad 4, random crop, random flip (uint8 images only).
      max_norm: > 0 projects every kernel to filter norm <= max_norm after the
        update (PlainNet eq. 2).
      symmetry_penalty: `(lambda, fn)` adds `lambda * fn(params)` to the loss,
        the soft symmetry constraint (`fn` = `models.symmetry_penalty` bound to
        the model); None: no penalty.

    Returns:
      `(new_state, metrics)` with scalar `loss` (the cross-entropy), `accuracy`
      and `learning_rate`, and `symmetry_penalty` (`fn(params)` before the
      update) when one is given.
    """
    images = batch["image"]
    if images.dtype == jnp.uint8:
        key = augment_key(seed, state.step)
        images = preprocess(images, key, dataset_name=dataset_name, augment=augment)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])
        loss = cross_entropy_loss(logits, batch["label"])
        penalty = jnp.zeros((), jnp.float32)
        if symmetry_penalty is not None:
            penalty = symmetry_penalty[1](params)
        total = loss + symmetry_penalty[0] * penalty if symmetry_penalty is not None else loss
        return total, (logits, updates["batch_stats"], loss, penalty)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (logits, batch_stats, loss, penalty)), grads = grad_fn(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if max_norm > 0:
        new_state = new_state.replace(params=project_kernels(new_state.params, max_norm))
    metrics_ = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "learning_rate": learning_rate_fn(state.step),
    }
    if symmetry_penalty is not None:
        metrics_["symmetry_penalty"] = penalty
    return new_state, metrics_


def eval_step(state: TrainState, batch: dict, *, dataset_name: str) -> dict:
    """Sums of loss and correct predictions over the unmasked examples of a batch.

    Args:
      state: the state (BN uses the running statistics).
      batch: `{"image", "label", "mask"}`; `mask` is False for padding examples.
      dataset_name: normalization statistics for uint8 images.

    Returns:
      `classification_metrics` of the batch's logits: `{"loss_sum", "top1",
      "top5", "count"}`; sum these over batches, then divide.
    """
    images = batch["image"]
    if images.dtype == jnp.uint8:
        images = data.normalize(images, dataset_name)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, images, train=False)
    return classification_metrics(logits, batch["label"], batch["mask"])


def classification_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
    """Sums over the unmasked examples of a batch: cross-entropy, top-1 and top-5 hits, count.

    The one metrics function of the trainer's eval (`eval_step`) and of
    `python -m dirac_jax.evaluate`. The logits are cast to float32 first, and a
    hit is the label among the indices `lax.top_k` returns: strict, so of tied
    logits (frequent in bfloat16) the lower class index ranks first, the same
    way in both. Top-5 is top-all for fewer than 5 classes.

    Args:
      logits: `(N, classes)`, any float dtype.
      labels: `(N,)` int class indices.
      mask: `(N,)` bool, False for padding examples.

    Returns:
      `{"loss_sum": float32, "top1": int32, "top5": int32, "count": int32}`.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.1, 0.5, 0.5, 0.9], [1.0, 0.0, 0.0, 0.0]])
      >>> m = classification_metrics(logits, jnp.array([2, 0]), jnp.array([True, True]))
      >>> int(m["top1"]), int(m["count"])
      (1, 2)
      >>> m = classification_metrics(logits[:1, :3], jnp.array([2]), jnp.array([True]))
      >>> int(m["top1"])  # classes 1 and 2 tie; the lower index ranks first
      0
    """
    logits = logits.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    hits = jax.lax.top_k(logits, k)[1] == labels[:, None]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
        "top1": jnp.sum((hits[:, 0] & mask).astype(jnp.int32)),
        "top5": jnp.sum((jnp.any(hits, axis=-1) & mask).astype(jnp.int32)),
        "count": jnp.sum(mask.astype(jnp.int32)),
    }


def _gather(arrays: data.ArrayDataset, idx):
    return {"image": arrays.images[idx], "label": arrays.labels[idx]}


def compile_steps(config, mesh: Mesh, learning_rate_fn, dataset_name: str, in_memory: bool = True):
    """The jitted train and eval functions for `mesh`.

    In-memory data: `train_fn(state, arrays, idx)` and `eval_fn(state, arrays,
    idx, mask)`, with `arrays` the replicated `ArrayDataset` and `idx`, `mask`
    sharded on `"data"`; `config.augment` turns the in-step augmentation on.
    Streamed data (augmented on the hosts): `train_fn(state, batch)` and
    `eval_fn(state, batch)`. The train function donates the state.
    `config.symmetry_penalty > 0` adds the soft symmetry constraint of the
    config's model to the loss.
    """
    config = _with_defaults(config)
    rep, batched = _replicated(mesh), NamedSharding(mesh, P("data"))
    step = functools.partial(
        train_step,
        learning_rate_fn=learning_rate_fn,
        dataset_name=dataset_name,
        seed=int(config.seed),
        augment=in_memory and bool(config.augment),
        max_norm=float(config.max_norm),
        symmetry_penalty=_symmetry_penalty(config),
    )
    evaluate_batch = functools.partial(eval_step, dataset_name=dataset_name)
    if in_memory:
        train_fn = jax.jit(
            lambda state, arrays, idx: step(state, _gather(arrays, idx)),
            in_shardings=(rep, rep, batched),
            out_shardings=(rep, rep),
            donate_argnums=0,
        )
        eval_fn = jax.jit(
            lambda state, arrays, idx, mask: evaluate_batch(
                state, {**_gather(arrays, idx), "mask": mask}
            ),
            in_shardings=(rep, rep, batched, batched),
            out_shardings=rep,
        )
    else:
        train_fn = jax.jit(
            step, in_shardings=(rep, batched), out_shardings=(rep, rep), donate_argnums=0
        )
        eval_fn = jax.jit(evaluate_batch, in_shardings=(rep, batched), out_shardings=rep)
    return train_fn, eval_fn


def _symmetry_penalty(config) -> tuple[float, Callable] | None:
    """`(lambda, params -> penalty)` of the config's model, or None when it is off."""
    lam = float(config.symmetry_penalty)
    if lam <= 0:
        return None
    model = create_model(config, _num_classes_for_validation(config))
    p = float(config.symmetry_penalty_p)
    return lam, functools.partial(models.symmetry_penalty, model, p=p)


def _fetch(tree):
    """Host copies of replicated global arrays (also in multi-process runs)."""
    return jax.tree.map(metrics.host_copy, tree)


# ---------------------------------------------------------------------------
# Evaluation and the fold check.


def evaluate(
    eval_fn: Callable, state: TrainState, batches, expected_count: int | None = None
) -> dict:
    """Loss and accuracy over every example of the eval batches exactly once.

    Args:
      eval_fn: from `compile_steps`.
      state: the state to evaluate.
      batches: iterable of `eval_fn`'s arguments after `state`; padding
        examples are masked out.
      expected_count: if given, the number of examples the batches must hold.

    Returns:
      `{"test_loss", "test_accuracy", "test_top5_accuracy", "count"}`.

    Raises:
      AssertionError: the masks counted a different number of examples than
        `expected_count` (a bug in the input pipeline).
    """
    totals = None
    for args in batches:
        out = eval_fn(state, *args)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = _fetch(totals)
    count = int(totals["count"])
    if expected_count is not None and count != expected_count:
        raise AssertionError(
            f"evaluation counted {count} examples, the test set has {expected_count}."
        )
    return {
        "test_loss": float(totals["loss_sum"]) / count,
        "test_accuracy": float(totals["top1"]) / count,
        "test_top5_accuracy": float(totals["top5"]) / count,
        "count": count,
    }


def fold_max_abs_error(model, variables, images: np.ndarray, chunk: int = 256) -> float:
    """max |folded logits - model logits| over `images`, both in float32.

    The folded net is `fold.folded_apply`'s: the conv-ReLU chain of a DiracNet
    or MobileNet (DiracNets sec. 1/2), or a WRN/ResNet with its kernels computed
    once (symmetric and `I + W` kernels). The model is re-created in float32 for
    the comparison, so the number measures the fold, not bfloat16 rounding of a
    half-precision run.

    Args:
      model: a model named in `FOLDABLE_MODELS`.
      variables: `{"params", "batch_stats"}` on the host.
      images: normalized float images `(N, H, W, C)`.
      chunk: images per forward pass.
    """
    from dirac_jax import fold as fold_lib

    model = model.clone(dtype=jnp.float32)
    apply, folded = fold_lib.folded_apply(model, variables)

    @jax.jit  # the weights are arguments: one compile, and no weights baked into it
    def error(variables, folded, x):
        unfolded = model.apply(variables, x, train=False)
        return jnp.max(jnp.abs(apply(folded, x) - unfolded))

    chunks = range(0, len(images), chunk)
    return max(float(error(variables, folded, images[i : i + chunk])) for i in chunks)


# ---------------------------------------------------------------------------
# The loop.


def _config_json(config) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def _flat(tree: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_config_against_workdir(config, workdir, *, resuming: bool, record: bool) -> str:
    """On resume, refuses a config that would train another run; records the config.

    Args:
      config: the validated config of this run.
      workdir: the run directory; its `config.json` is the recorded config.
      resuming: whether the workdir holds a checkpoint this run continues.
      record: write `config.json` (one process of a multi-process run).

    Returns:
      The changed fields that keep the run, as `"name (old -> new), ..."`, or "".

    Raises:
      ConfigError: resuming with a field outside `RESUMABLE_FIELDS` changed: one
        line naming the fields, the recorded config and a new --workdir.
    """
    path = workdir / CONFIG_FILE
    current = _config_json(config)
    accepted = ""
    if resuming and path.exists():
        recorded = _with_defaults(ml_collections.ConfigDict(json.loads(path.read_text())))
        old, new = _flat(json.loads(_config_json(recorded))), _flat(json.loads(current))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        trajectory = [k for k in changed if k not in RESUMABLE_FIELDS]

        def listed(keys):
            return ", ".join(f"{k} ({_short(old.get(k))} -> {_short(new.get(k))})" for k in keys)

        if trajectory:
            raise ConfigError(
                f"{workdir} holds a run with another config: {listed(trajectory)} would change "
                f"its training. Resume with the recorded config ({path}), or start a new --workdir."
            )
        accepted = listed(changed)
    if record:
        path.write_text(current)
    return accepted


def _sigterm_test_hook() -> Callable[[int], None]:
    """The `SIGTERM_TEST_ENV` hook: called after every step; sends SIGTERM after the chosen one."""
    value = os.environ.get(SIGTERM_TEST_ENV, "")
    if not value:
        return lambda step: None
    at, _, scope = value.partition(":")
    if not at.isdigit() or scope not in ("", "group"):
        raise ValueError(f"{SIGTERM_TEST_ENV} must be STEP or STEP:group, got {value!r}.")

    def hook(step: int) -> None:
        if step != int(at):
            return
        if scope == "group":  # as SLURM, Kubernetes and TPU maintenance events do
            os.killpg(os.getpgrp(), signal.SIGTERM)
        else:
            signal.raise_signal(signal.SIGTERM)

    return hook


def _format(values: dict) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains, evaluates and checkpoints a model; resumes from `workdir` if it holds a run.

    Writes to `workdir`: `checkpoints/`, `metrics.jsonl`, TensorBoard events,
    `config.json`, and at the end `summary.json`, `curves.png` and (Dirac
    models) `dirac_scales.png`. On SIGTERM it saves a checkpoint at the current
    step and returns early.

    Args:
      config: see `configs/`; checked by `validate_config` first.
      workdir: the run directory, local or in a bucket (`gs://...`, the `gcs`
        extra); rerunning with the same one resumes.

    Returns:
      The summary: `test_accuracy`, `test_top5_accuracy`, `test_loss`,
      `train_accuracy` and `train_loss` (the last log window's running means;
      process 0 only), `num_params`, with `config.symmetry_penalty > 0` the
      same test metrics of the symmetrized net (`test_accuracy_symmetrized`,
      ...), `symmetry` and `symmetry_penalty` (the config's),
      `fold_max_abs_error` (None for models that do not fold), `step`,
      `wall_time_s`, `preempted` (False), and a few descriptive fields. After a
      SIGTERM: `{"preempted": True, "step": ..., "wall_time_s": ...}` and no
      summary.json.

    Raises:
      ConfigError: a bad config (before any data loading or compilation).
      data.DataNotFoundError: the dataset is not where the config says.
      CheckpointError: the latest checkpoint cannot be restored.
      NonFiniteLossError: the loss or the state became NaN/Inf.
    """
    start_time = time.time()
    config = validate_config(config)
    chief = jax.process_index() == 0
    mesh = make_mesh()
    # Data first: a missing dataset fails before anything is written.
    inputs = input_pipeline.create_input(config, mesh)
    workdir = _paths.resolve(workdir)  # local (made absolute) or a bucket, gs://...
    if not _paths.is_uri(workdir):  # a bucket has no folders to create
        workdir.mkdir(parents=True, exist_ok=True)
    model = create_model(config, inputs.num_classes)
    num_steps = total_steps(config, inputs.steps_per_epoch)
    lr_fn = create_learning_rate_fn(config, inputs.steps_per_epoch)
    state = create_train_state(
        config,
        model,
        jax.random.key(config.seed),
        inputs.image_shape,
        lr_fn,
        mesh,
        steps_per_epoch=inputs.steps_per_epoch,
    )
    num_params = models.count_params(state.params)

    mngr = checkpoint.create_manager(
        workdir, keep=int(config.keep_checkpoints), async_save=bool(config.async_checkpointing)
    )
    batches = None
    try:
        # Before any restore or step: a resume must be the same run (every process checks).
        accepted = _check_config_against_workdir(
            config, workdir, resuming=mngr.latest_step() is not None, record=chief
        )
        state, start_step = checkpoint.restore_latest(mngr, state)
        batches = inputs.train_batches()
        restored = bool(start_step) and checkpoint.restore_data(mngr, start_step, batches)
        # The restored Grain state places the stream; without one, the step does. Either
        # way the next batch must be the one of `start_step` (checked batch by batch).
        if not restored:
            batches.seek(start_step)
        if start_step:
            logging.info(
                "Resumed from %s at step %d%s%s.",
                checkpoint.checkpoint_dir(workdir),
                start_step,
                " with the saved input position" if restored else "",
                f"; changed fields that keep the run: {accepted}" if accepted else "",
            )
        logging.info(
            "%s: %d params, %d steps (%d per epoch), batch %d on %d devices.",
            config.model.name, num_params, num_steps, inputs.steps_per_epoch,
            config.batch_size, jax.device_count(),
        )  # fmt: skip
        result = _train_loop(
            config, workdir, mngr, inputs, batches, state, start_step, num_steps, lr_fn, chief
        )
    finally:
        if batches is not None:
            batches.close()
        mngr.wait_until_finished()
        mngr.close()
    state, step, preempted, last_eval = result
    if preempted:
        return {"preempted": True, "step": step, "wall_time_s": time.time() - start_time}

    fold_error = None
    fold_images = int(config.fold_check_images)
    if config.model.name in FOLDABLE_MODELS and fold_images > 0:
        variables = _fetch({"params": state.params, "batch_stats": state.batch_stats})
        fold_error = fold_max_abs_error(model, variables, inputs.fold_check_images(fold_images))
    summary = {
        "test_accuracy": last_eval["test_accuracy"],
        "test_top5_accuracy": last_eval["test_top5_accuracy"],
        "test_loss": last_eval["test_loss"],
        "num_params": num_params,
        "fold_max_abs_error": fold_error,
        "fold_check_images": min(fold_images, inputs.num_test) if fold_error is not None else 0,
        "step": step,
        "wall_time_s": time.time() - start_time,
        "preempted": False,
        "model": config.model.name,
        "dataset": config.dataset.name,
        "num_test_examples": inputs.num_test,
        "steps_per_epoch": inputs.steps_per_epoch,
        "symmetry": config.model.get("symmetry"),
        "symmetry_penalty": config.symmetry_penalty,
        **{k: v for k, v in last_eval.items() if k.endswith(SYMMETRIZED)},
    }
    if chief:
        records = metrics.read_metrics(workdir)
        trains = [r for r in records if r.get("kind") == "train"]
        # The running means of the last log window (augmented batches, BN in train mode).
        summary["train_accuracy"] = trains[-1]["train_accuracy"] if trains else None
        summary["train_loss"] = trains[-1]["train_loss"] if trains else None
        (workdir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        metrics.plot_curves(records, workdir / metrics.CURVES_FILE)
        metrics.plot_dirac_scales(
            records, workdir / metrics.DIRAC_SCALES_FILE, inputs.steps_per_epoch
        )
    logging.info("Summary: %s", _format({k: v for k, v in summary.items() if v is not None}))
    return summary


def _train_loop(config, workdir, mngr, inputs, batches, state, start_step, num_steps, lr_fn, chief):
    """Steps from `start_step` to `num_steps`.

    Returns:
      `(state, step, preempted, last_eval)`: `last_eval` is the last eval record
      (None after a preemption, which skips the eval).
    """
    train_fn, eval_fn = compile_steps(config, inputs.mesh, lr_fn, inputs.name, inputs.in_memory)
    symmetrize = None
    if config.symmetry_penalty > 0:
        model = create_model(config, inputs.num_classes)
        symmetrize = jax.jit(
            functools.partial(models.symmetrize_params, model),
            out_shardings=_replicated(inputs.mesh),
        )
    log_every = int(config.log_every_steps)
    eval_every = int(config.eval_every_steps)
    eval_every = eval_every if eval_every > 0 else inputs.steps_per_epoch
    ckpt_every = int(config.checkpoint_every_steps)
    images_per_step = int(config.batch_size)

    writer = metrics.MetricWriter(workdir, start_step=start_step, enabled=chief)
    bar = metrics.ProgressBar(num_steps, start_step, enabled=chief, images_per_step=images_per_step)
    pending: list[tuple[int, dict]] = []  # device metrics not yet checked
    window: list[dict] = []  # host metrics since the last log
    last_log_time = time.time()
    last_eval = None

    def last_good():
        latest = mngr.latest_step()
        where = checkpoint.checkpoint_dir(workdir)
        if latest is None:
            return "No checkpoint was saved before it."
        return f"The last good checkpoint, step {latest} in {where}, is kept."

    def flush_pending():
        # Checked in order since the last flush, so the error names the first bad step.
        for step, values in pending:
            values = {k: float(v) for k, v in _fetch(values).items()}
            if not math.isfinite(values["loss"]):
                raise NonFiniteLossError(
                    f"training diverged: the loss is {values['loss']} at step {step}. "
                    f"{last_good()} Lower config.learning_rate (or check the data) and start "
                    "a new --workdir, or move the later checkpoints away and rerun."
                )
            window.append(values)
        pending.clear()

    def save(step):
        if mngr.latest_step() == step:
            return
        if not checkpoint.all_finite(state):
            raise NonFiniteLossError(
                f"the training state has NaN or Inf values at step {step}; not saving it. "
                f"{last_good()} Lower config.learning_rate and start a new --workdir."
            )
        checkpoint.save(mngr, step, state, data=batches)

    def run_eval(step):
        nonlocal last_log_time, last_eval
        t = time.time()
        result = evaluate(eval_fn, state, inputs.eval_batches(), expected_count=inputs.num_test)
        scales = metrics.dirac_scale_means(state.params)
        record = {
            "step": step,
            "kind": "eval",
            "test_loss": result["test_loss"],
            "test_accuracy": result["test_accuracy"],
            "test_top5_accuracy": result["test_top5_accuracy"],
        }
        if scales["a"]:
            record.update(dirac_a=scales["a"], dirac_b=scales["b"])
        if symmetrize is not None:
            projected = state.replace(params=symmetrize(state.params))
            result = evaluate(eval_fn, projected, inputs.eval_batches(), inputs.num_test)
            for k in ("test_loss", "test_accuracy", "test_top5_accuracy"):
                record[k + SYMMETRIZED] = result[k]
        writer.write(record)
        logging.info(
            "step %d eval: %s (%.1f s)",
            step,
            _format({k: record[k] for k in ("test_loss", "test_accuracy")}),
            time.time() - t,
        )
        last_log_time += time.time() - t  # keep eval time out of images/s
        last_eval = record

    step = start_step
    preempted = False
    sigterm_test_hook = _sigterm_test_hook()
    try:
        with checkpoint.Preemption(mngr) as preemption:
            for step in range(start_step + 1, num_steps + 1):
                state, step_metrics = train_fn(state, *next(batches))
                pending.append((step, step_metrics))
                sigterm_test_hook(step)
                bar.update()
                is_last = step == num_steps
                do_log = step % log_every == 0 or is_last
                # Every step, on every process: all processes stop at the same step.
                preempted = preemption.reached(step)
                do_ckpt = (ckpt_every and step % ckpt_every == 0) or is_last or preempted
                do_eval = (step % eval_every == 0 or is_last) and not preempted
                if not (do_log or do_ckpt or do_eval or preempted):
                    continue
                flush_pending()
                if (do_log or preempted) and window:
                    now = time.time()
                    record = {
                        "step": step,
                        "kind": "train",
                        "train_loss": float(np.mean([m["loss"] for m in window])),
                        "train_accuracy": float(np.mean([m["accuracy"] for m in window])),
                        "learning_rate": float(window[-1]["learning_rate"]),
                        **(
                            {"symmetry_penalty": float(window[-1]["symmetry_penalty"])}
                            if "symmetry_penalty" in window[-1]
                            else {}
                        ),
                        "images_per_s": len(window)
                        * images_per_step
                        / max(now - last_log_time, 1e-9),
                    }
                    writer.write(record)
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}")
                    logging.info(
                        "step %d/%d: %s",
                        step,
                        num_steps,
                        _format({k: v for k, v in record.items() if k not in ("step", "kind")}),
                    )
                    window.clear()
                    last_log_time = now
                if do_ckpt:
                    save(step)
                if do_eval:
                    run_eval(step)
                if preempted:
                    mngr.wait_until_finished()
                    break
            if start_step >= num_steps:
                # A finished run rerun (or a shorter num_train_steps): evaluate for the summary.
                run_eval(start_step)
    finally:
        bar.close()
        writer.close()
    return state, step, preempted, last_eval
