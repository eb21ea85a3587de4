"""A finished run's workdir as a product: its config, model, trained variables and input.

`load(workdir)` rebuilds the model from the recorded `config.json` and restores
only the parameters and BatchNorm statistics of the latest checkpoint (not the
optimizer state, and without touching the training data). `preprocess` is the
input side of the trained classifier: images as the dataset stores them
(uint8, NHWC, at their stored size; for ImageNet the 224x224 eval crop) to the
normalized, padded model input, in pure JAX, so exported models carry it.

The workdir may be local or in a bucket (`gs://...`, the `gcs` extra).

Example (after `python -m dirac_jax.main --config=... --workdir=W`)::

  model, variables, config = dirac_jax.load("W")
  logits = model.apply(variables, preprocess(uint8_images, config), train=False)
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dirac_jax import _paths, checkpoint, data
from dirac_jax.config_schema import create_model

__all__ = [
    "CONFIG_FILE",
    "CURVES_FILE",
    "DIRAC_SCALES_FILE",
    "EVAL_FILE",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "SYMMETRIZED",
    "Run",
    "WorkdirError",
    "current_metric_names",
    "input_shape",
    "load",
    "load_run",
    "model_input_shape",
    "num_classes",
    "preprocess",
    "read_config",
    "read_summary",
    "restore_variables",
]

# The files of a run, by the module that writes them. The trainer (`train`):
#: File name of the validated config a run records in its workdir at the start (`train`).
CONFIG_FILE = "config.json"  # the validated config, recorded at the start
#: File name of the final metrics the trainer writes in the workdir at the end.
SUMMARY_FILE = "summary.json"  # the final metrics, written at the end
# `metrics`: every train and eval record, and the plots made from them at the end.
#: File name of every train and eval record of a run, one JSON object a line (`metrics`).
METRICS_FILE = "metrics.jsonl"
#: File name of the training-curve plot the trainer writes at the end (`metrics.plot_curves`).
CURVES_FILE = "curves.png"
#: File name of the plot of the Dirac scales over training (`metrics.plot_dirac_scales`).
DIRAC_SCALES_FILE = "dirac_scales.png"
# `python -m dirac_jax.evaluate`:
#: File name of the metrics `python -m dirac_jax.evaluate` writes, per net.
EVAL_FILE = "eval.json"
# Suffix of the eval metrics of the net projected by `param.symmetrize` (soft symmetry runs).
#: Suffix of the eval metrics of the net projected by `param.symmetrize` (soft symmetry runs).
SYMMETRIZED = "_symmetrized"

# One vocabulary of metrics: `top1`, `top5`, `loss`, `count`, nested per net in eval.json
# and prefixed by the split in summary.json and metrics.jsonl (`test_top1`, `train_loss`).
# Files written before it used these names; `current_metric_names` reads them as today's.
_OLD_METRIC_NAMES = (
    ("test_top5_accuracy", "test_top5"),
    ("test_accuracy", "test_top1"),
    ("train_accuracy", "train_top1"),
)

# What evaluation and export need of the training state; the optimizer state stays on disk.
_RESTORED = ("params", "batch_stats", "step")


class WorkdirError(FileNotFoundError):
    """The workdir holds no finished run to load; the message says what is missing."""


def current_metric_names(record: dict) -> dict:
    """`record` (a summary or a metrics record) with the metric names of earlier releases renamed.

    `test_accuracy` was `test_top1`, `test_top5_accuracy` `test_top5` and
    `train_accuracy` `train_top1`, suffixes (`_symmetrized`) kept; other keys
    stay. Every reader of a run's files goes through it, so old runs still read.

    Examples:
      >>> current_metric_names({"step": 5, "test_accuracy_symmetrized": 0.5, "test_loss": 1.0})
      {'step': 5, 'test_top1_symmetrized': 0.5, 'test_loss': 1.0}
    """

    def name(key: str) -> str:
        for old, new in _OLD_METRIC_NAMES:
            if key == old or key.startswith(old + "_"):
                return new + key[len(old) :]
        return key

    return {name(k): v for k, v in record.items()}


def read_summary(workdir: str | os.PathLike) -> dict:
    """The final metrics of a finished run (`SUMMARY_FILE`), in today's metric names.

    Raises:
      WorkdirError: the run has no summary (not finished, or not a workdir).
    """
    path = _paths.resolve(workdir) / SUMMARY_FILE
    if not path.is_file():
        raise WorkdirError(f"{path} does not exist: the run in {workdir} has not finished.")
    return current_metric_names(json.loads(path.read_text()))


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run recorded in `workdir/config.json`.

    Raises:
      WorkdirError: there is no `config.json` (not a training workdir).
    """
    path = _paths.resolve(workdir) / CONFIG_FILE
    if not path.is_file():
        raise WorkdirError(
            f"{path} does not exist: {workdir} is not a training workdir. Train first with "
            f"`python -m dirac_jax.main --config=CONFIG --workdir={workdir}`."
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def num_classes(config, variables: dict | None = None) -> int:
    """Classifier outputs of a run: its small dataset's classes, or its classifier's width.

    A streamed dataset (ImageNet) counts its classes from the data at training
    time (a folder tree may hold fewer than 1000), so the count is read from the
    restored classifier `fc`; without `variables` it is 1000.
    """
    if config.dataset.name in data.NUM_CLASSES:
        return data.NUM_CLASSES[config.dataset.name]
    if variables is not None and "fc" in variables.get("params", {}):
        return int(variables["params"]["fc"]["bias"].shape[-1])
    return 1000


def input_shape(config) -> tuple[int, int, int]:
    """`(H, W, C)` of the images the exported classifier takes: as the dataset stores them.

    Small datasets: their stored size (28x28x1 for MNIST-likes, 32x32x3 for
    CIFAR); ImageNet: the eval crop, `config.dataset.image_size` (224 by default).
    """
    if config.dataset.name not in data.NUM_CLASSES:
        size = int(config.dataset.get("image_size", 224))
        return (size, size, 3)
    return data.image_shape(config.dataset.name)


def model_input_shape(config) -> tuple[int, int, int]:
    """`(H, W, C)` of the model's input: the stored images padded as `data.prepare` does."""
    h, w, c = input_shape(config)
    if config.dataset.name not in data.NUM_CLASSES:
        return (h, w, c)
    size = max(h, w, 32)
    return (size, size, c)


def preprocess(images: jax.Array, config) -> jax.Array:
    """Stored images to the model's input: zero-pad (as `data.prepare`), then `data.normalize`.

    Pure JAX, so `jax.export` and the ONNX export carry it inside the graph.

    Args:
      images: uint8 (or 0..255 float) `(N, H, W, C)` at `input_shape(config)`.
      config: the run's config (dataset name).

    Returns:
      float32 `(N, *model_input_shape(config))`.

    Raises:
      ValueError: `images` do not have the stored shape.
    """
    expected = input_shape(config)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"images of shape {tuple(images.shape)} are not (N, *{expected}), the stored "
            f"{config.dataset.name} images this classifier takes."
        )
    target = model_input_shape(config)
    dh, dw = target[0] - expected[0], target[1] - expected[1]
    if dh or dw:
        pads = ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0))
        images = jnp.pad(images, pads)
    return data.normalize(images, config.dataset.name)


def _abstract(tree) -> Any:
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)


def restore_variables(workdir: str | os.PathLike) -> tuple[dict, int]:
    """The parameters and BN statistics of the latest checkpoint in `workdir`, on the host.

    Only these entries are read (orbax partial restore): the optimizer state is
    not loaded.

    Returns:
      `({"params", "batch_stats"}, step)` with numpy leaves.

    Raises:
      WorkdirError: no finished checkpoint in `workdir/checkpoints`.
      checkpoint.CheckpointError: the checkpoint cannot be read.
    """
    directory = checkpoint.checkpoint_dir(workdir)
    if not directory.is_dir():
        raise WorkdirError(
            f"{directory} does not exist: no checkpoint to load. Train first with "
            f"`python -m dirac_jax.main --config=CONFIG --workdir={workdir}`."
        )
    options = ocp.CheckpointManagerOptions(create=False)
    # Checkpoints hold the train state and, for streamed data, the input position
    # (`checkpoint.save`); only the state's params and BN statistics are read.
    handlers = {checkpoint.STATE_ITEM: ocp.PyTreeCheckpointHandler()}
    with ocp.CheckpointManager(directory, options=options, item_handlers=handlers) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise WorkdirError(
                f"{directory} holds no finished checkpoint; train (or resume) the run first."
            )
        try:
            saved = mngr.item_metadata(step)[checkpoint.STATE_ITEM].tree
            wanted = _abstract({k: saved[k] for k in _RESTORED if k in saved})
            restore = ocp.args.PyTreeRestore(
                item=wanted,
                restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
                partial_restore=True,
            )
            restored = mngr.restore(
                step, args=ocp.args.Composite(**{checkpoint.STATE_ITEM: restore})
            )[checkpoint.STATE_ITEM]
        except Exception as e:
            reason = (str(e).splitlines() or [""])[0][:300]
            raise checkpoint.CheckpointError(
                f"the checkpoint {directory / str(step)} cannot be read ({type(e).__name__}: "
                f"{reason}); move that step directory away to load an earlier one."
            ) from e
    variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}
    return jax.tree.map(np.asarray, variables), int(step)


class Run(NamedTuple):
    """A trained run: the model, its variables, its config and the checkpoint's step."""

    model: Any
    variables: dict
    config: ml_collections.ConfigDict
    step: int


def load_run(workdir: str | os.PathLike) -> Run:
    """`load`, plus the step of the checkpoint it restored."""
    config = read_config(workdir)
    variables, step = restore_variables(workdir)
    model = create_model(config, num_classes(config, variables))
    shape = model_input_shape(config)
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape), jnp.float32), train=False)
    )
    got = jax.tree.map(lambda x: (x.shape, x.dtype), variables)
    want = jax.tree.map(lambda x: (x.shape, x.dtype), dict(expected))
    if got != want:
        raise checkpoint.CheckpointError(
            f"the checkpoint at step {step} in {checkpoint.checkpoint_dir(workdir)} does not hold "
            f"the variables of the model in {_paths.resolve(workdir) / CONFIG_FILE} "
            f"({config.model.name}); was config.json replaced? Restore it or train anew."
        )
    return Run(model, variables, config, step)


def load(workdir: str | os.PathLike) -> tuple[Any, dict, ml_collections.ConfigDict]:
    """The trained model of a workdir, for Python users.

    Args:
      workdir: the `--workdir` of a training run.

    Returns:
      `(model, variables, config)`: the Flax module built from the recorded
      config (bfloat16 compute if the run used `half_precision`), the
      `{"params", "batch_stats"}` of the latest checkpoint (numpy), and the
      config. `model.apply(variables, preprocess(images, config), train=False)`
      gives the logits.

    Raises:
      WorkdirError: no `config.json` or no checkpoint.
      checkpoint.CheckpointError: the checkpoint cannot be read, or does not
        belong to the recorded model.
    """
    run = load_run(workdir)
    return run.model, run.variables, run.config
