"""The training loop: `train_and_evaluate(config, workdir)`, resumable and preemptible.

The layout follows flax examples/imagenet, one concept per module below this
one: `config_schema` (the config, its defaults, validation, the model),
`optim` (schedule and optimizer), `sharding` (the mesh, placing batches and
state), `steps` (the jitted train and eval steps), `input_pipeline` (the
device-resident and Grain-streamed inputs), `checkpoint`, `metrics` and
`workdir` (the names of a run's files). This module holds the loop and what
only the loop needs: the resume check against the recorded config, the fold
check, and the preemption test hook.

All randomness is a function of `(config.seed, step)`, whatever the number of
hosts, so a run resumed from a checkpoint at step `k` (the streamed input's
position is saved with it) continues bit for bit as if it had never stopped.

Soft symmetry runs (`config.symmetry_penalty > 0`) also report, at every
evaluation, the net with its symmetric-layer kernels projected by
`param.symmetrize` (`test_top1_symmetrized`, ...), as the slides do at test
time.

The run's model is built once (`config_schema.create_model`), and its metrics
use one vocabulary: `top1`, `top5`, `loss` with the split as prefix
(`test_top1`, `train_loss`, ...), as `steps.evaluate_batches` returns them.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dirac_jax import _paths, checkpoint, input_pipeline, metrics, models
from dirac_jax.checkpoint import NonFiniteLossError
from dirac_jax.config_schema import (
    FOLDABLE_MODELS,
    RESUMABLE_FIELDS,
    ConfigError,
    create_model,
    flatten,
    to_json,
    total_steps,
    validate_config,
    with_defaults,
)
from dirac_jax.fold import deployable
from dirac_jax.optim import create_learning_rate_fn
from dirac_jax.sharding import host_copies, make_mesh, replicated
from dirac_jax.steps import compile_steps, create_train_state, evaluate_batches
from dirac_jax.workdir import (
    CONFIG_FILE,
    CURVES_FILE,
    DIRAC_SCALES_FILE,
    SUMMARY_FILE,
    SYMMETRIZED,
)

__all__ = ["SIGTERM_TEST_ENV", "fold_max_abs_error", "train_and_evaluate"]

# Test hook: DIRAC_JAX_TEST_SIGTERM=STEP (or STEP:group) makes the trainer send SIGTERM to
# itself (to its process group) right after step STEP, so that preemption tests stop at a
# chosen step instead of after a sleep.
#: Environment variable that makes the trainer SIGTERM itself after a given step (for tests).
SIGTERM_TEST_ENV = "DIRAC_JAX_TEST_SIGTERM"

# What each evaluation records of `steps.evaluate_batches`'s result, as `test_{name}`.
_TEST_METRICS = ("loss", "top1", "top5")


def fold_max_abs_error(model, variables, images: np.ndarray, chunk: int = 256) -> float:
    """The largest `|folded logits - model logits|` over `images`, both in float32.

    The folded net is `fold.deployable`'s: the conv-ReLU chain of a DiracNet
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
    model = model.clone(dtype=jnp.float32)
    apply, folded = deployable(model, variables)

    @jax.jit  # the weights are arguments: one compile, and no weights baked into it
    def error(variables, folded, x):
        unfolded = model.apply(variables, x, train=False)
        return jnp.max(jnp.abs(apply(folded, x) - unfolded))

    chunks = range(0, len(images), chunk)
    return max(float(error(variables, folded, images[i : i + chunk])) for i in chunks)


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
    current = to_json(config)
    accepted = ""
    if resuming and path.exists():
        try:
            recorded = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path}, the config this run was started with, is not valid JSON ({e}); it "
                "is left untouched. Repair it, or delete it to resume without the check that "
                "the config still trains the same run."
            ) from None
        recorded = with_defaults(ml_collections.ConfigDict(recorded))
        old, new = flatten(json.loads(to_json(recorded))), flatten(json.loads(current))
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
    if record:  # whole or not at all: the other processes of the run read it meanwhile
        _paths.write_text_atomic(path, current)
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
      The summary: `test_top1`, `test_top5`, `test_loss`, `train_top1` and
      `train_loss` (the last log window's running means; process 0 only),
      `num_params`, with `config.symmetry_penalty > 0` the same test metrics
      of the symmetrized net (`test_top1_symmetrized`,
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
            config, workdir, mngr, inputs, batches, state, start_step, num_steps, lr_fn, chief,
            model,
        )  # fmt: skip
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
        variables = host_copies({"params": state.params, "batch_stats": state.batch_stats})
        fold_error = fold_max_abs_error(model, variables, inputs.fold_check_images(fold_images))
    summary = {
        **{f"test_{k}": last_eval[f"test_{k}"] for k in _TEST_METRICS},
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
        summary["train_top1"] = trains[-1]["train_top1"] if trains else None
        summary["train_loss"] = trains[-1]["train_loss"] if trains else None
        _paths.write_text_atomic(workdir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        metrics.plot_curves(records, workdir / CURVES_FILE)
        metrics.plot_dirac_scales(records, workdir / DIRAC_SCALES_FILE, inputs.steps_per_epoch)
    logging.info("Summary: %s", _format({k: v for k, v in summary.items() if v is not None}))
    return summary


def _train_loop(
    config, workdir, mngr, inputs, batches, state, start_step, num_steps, lr_fn, chief, model
):
    """Steps from `start_step` to `num_steps` of `model`, the run's.

    Returns:
      `(state, step, preempted, last_eval)`: `last_eval` is the last eval record
      (None after a preemption, which skips the eval).
    """
    train_fn, eval_fn = compile_steps(
        config, inputs.mesh, lr_fn, inputs.name, inputs.in_memory, model=model
    )
    symmetrize = None
    if config.symmetry_penalty > 0:
        symmetrize = jax.jit(
            functools.partial(models.symmetrize_params, model),
            out_shardings=replicated(inputs.mesh),
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
            values = {k: float(v) for k, v in host_copies(values).items()}
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
        result = evaluate_batches(
            eval_fn, state, inputs.eval_batches(), expected_count=inputs.num_test
        )
        scales = metrics.dirac_scale_means(state.params)
        record = {"step": step, "kind": "eval", **{f"test_{k}": result[k] for k in _TEST_METRICS}}
        if scales["a"]:
            record.update(dirac_a=scales["a"], dirac_b=scales["b"])
        if symmetrize is not None:
            projected = state.replace(params=symmetrize(state.params))
            result = evaluate_batches(eval_fn, projected, inputs.eval_batches(), inputs.num_test)
            for k in _TEST_METRICS:
                record[f"test_{k}{SYMMETRIZED}"] = result[k]
        writer.write(record)
        logging.info(
            "step %d eval: %s (%.1f s)",
            step,
            _format({k: record[k] for k in ("test_loss", "test_top1")}),
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
                        "train_top1": float(np.mean([m["accuracy"] for m in window])),
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
