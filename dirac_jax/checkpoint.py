"""Checkpoints of the training state: save, resume, preemption and the two failure modes.

An orbax `CheckpointManager` keeps the last `keep` checkpoints under
`workdir/checkpoints/<step>`. A checkpoint is the whole `TrainState` pytree:
`step`, `params`, `opt_state` (the momentum buffers and the schedule count) and
`batch_stats`. The workdir may be local or in a bucket (`gs://...`): paths are
`etils.epath` paths, and orbax writes arrays through tensorstore; on GCS a
finished step is marked by its `commit_success.txt`. There is no RNG state to
save: the trainer derives every random number from `(config.seed, step)` and
the data order from `(config.seed, epoch)`. For device-resident data the step
alone fixes where a resumed run continues; a streamed input also saves its
Grain iterator's position (below), and the trainer checks that it agrees with
the step.

A save interrupted by preemption leaves a partial step: a local
`<step>.orbax-checkpoint-tmp-*` directory, or on GCS a step directory without
orbax's commit marker. It never holds a usable checkpoint and never blocks a
run: `create_manager` has orbax remove it (`cleanup_tmp_directories`, orbax's
own finalization check) and logs one line naming it; the run resumes from the
latest complete step.

Failure modes, each one exception with one message that says what to do:

* `CheckpointError`: a complete checkpoint that cannot be restored (corrupt,
  or from a different model). Nothing is deleted or overwritten; the message
  names the directory to move away.
* `NonFiniteLossError`: training produced a NaN or Inf. The trainer checks the
  state is finite before every save, so the last checkpoint stays a good one.

A checkpoint step directory holds `state` (the `TrainState`) and, for streamed
input, `data` (the Grain iterator's own state, one JSON file per process, saved
by Grain's orbax handler `grain.checkpoint.CheckpointSave`) and `data_origin`
(the step that iterator began at and its number of workers, orbax JSON).

Preemption: `Preemption.reached(step)`, polled at every step, says when to
save and stop. With several processes it is JAX's preemption sync point (via
orbax's `CheckpointManager.reached_preemption`): a SIGTERM to any process makes
all of them agree on the same step, without a collective of our own that a
dying host could hang. A single process has no coordination service, so there
`PreemptionSignal` turns SIGTERM into a flag.

Orbax API: this module uses orbax's `CheckpointManager` with `ocp.args` (the
API orbax now calls "v0"), not `orbax.checkpoint.experimental.v1` (orbax
0.12.8, the newest release). v1's `training.Checkpointer` would replace the
four `ocp.args.Composite(...)` wrappers by plain dicts and save nothing else:
it has no `reached_preemption` (which `Preemption` needs), Grain saves its
iterator through v0's handler args (`grain.checkpoint.CheckpointSave`), and v1
is still marked experimental, so its names may change between releases. A
later move keeps old checkpoints readable: v1's `Checkpointer` is built on the
same `CheckpointManager` and step layout, and loads this module's checkpoints
as they are (checked with orbax 0.12.8).

Example:
  >>> import jax.numpy as jnp, tempfile
  >>> mngr = create_manager(tempfile.mkdtemp(), keep=2)
  >>> state = {"step": jnp.array(3), "params": {"w": jnp.ones(2)}}
  >>> save(mngr, 3, state)
  >>> restored, step = restore_latest(mngr, state)
  >>> step, restored["params"]["w"].tolist()
  (3, [1.0, 1.0])
  >>> mngr.close()
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from dirac_jax import _paths

__all__ = [
    "CHECKPOINT_DIR",
    "CheckpointError",
    "DATA_ITEM",
    "DATA_ORIGIN_ITEM",
    "NonFiniteLossError",
    "Preemption",
    "PreemptionSignal",
    "STATE_ITEM",
    "all_finite",
    "checkpoint_dir",
    "create_manager",
    "restore_data",
    "restore_latest",
    "save",
]

CHECKPOINT_DIR = "checkpoints"
# The items of a checkpoint step directory: the TrainState, and the input position.
STATE_ITEM = "state"
DATA_ITEM = "data"
DATA_ORIGIN_ITEM = "data_origin"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names it and what to do."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or Inf; the message names the step and the last good checkpoint."""


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    """The directory holding the step directories of a run (local, absolute, or `gs://...`)."""
    return _paths.resolve(workdir) / CHECKPOINT_DIR


def create_manager(
    workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True
) -> ocp.CheckpointManager:
    """An orbax `CheckpointManager` for `workdir/checkpoints`, keeping the last `keep` steps.

    The caller decides when to save (`save`), so no save interval is set here.
    Opening it removes the partial steps of interrupted saves (logged, one
    line): open it only in the run that writes the workdir, not beside one.

    Args:
      workdir: the run's directory; created if missing.
      keep: how many of the most recent checkpoints to keep (>= 1).
      async_save: write in a background thread. The device-to-host copy still
        happens before `save` returns (orbax's default), so the train step may
        donate the saved buffers right after.

    Returns:
      The manager; call `close()` when done.

    Raises:
      ValueError: `keep` < 1.
      CheckpointError: the checkpoint directory cannot be read.
    """
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep}.")
    directory = checkpoint_dir(workdir)
    # Partial steps of an interrupted save, by orbax's own test (a tmp name locally, no
    # commit marker on GCS); orbax removes exactly these when the manager opens.
    options = ocp.CheckpointManagerOptions(
        # `max_to_keep=keep` keeps the same steps; orbax deprecates it for this policy.
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    try:
        partial = sorted(ocp.path.step.tmp_checkpoints(epath.Path(directory)))
        mngr = ocp.CheckpointManager(directory, options=options)
    except Exception as e:
        raise CheckpointError(
            f"cannot open the checkpoint directory {directory} ({type(e).__name__}: {e}). "
            "Fix or move it away, or start a new --workdir."
        ) from e
    if partial:
        latest = mngr.latest_step()
        logging.warning(
            "Skipped the partial checkpoint%s %s in %s (a save interrupted by preemption; "
            "removed); %s.",
            "s" if len(partial) > 1 else "",
            ", ".join(partial),
            directory,
            "no complete checkpoint remains"
            if latest is None
            else f"resuming from the latest complete step, {latest}",
        )
    return mngr


def restore_latest(mngr: ocp.CheckpointManager, template: Any) -> tuple[Any, int]:
    """Restores the latest checkpoint into the structure and shardings of `template`.

    Args:
      mngr: from `create_manager`.
      template: a pytree like the saved one (e.g. a freshly created `TrainState`);
        its arrays' shapes, dtypes and shardings say how to restore.

    Returns:
      `(state, step)`: the restored pytree and its step, or `(template, 0)` if
      there is no checkpoint.

    Raises:
      CheckpointError: the latest complete checkpoint cannot be restored. The
        message names the step directory and what to do; nothing is deleted.
        (Partial steps never get here: `create_manager` skips them.) After a
        failed restore orbax's abandoned reads may still report
        `RuntimeError('Event loop is closed')` from their threads for a moment;
        this module leaves the process's hooks alone, and the command lines drop
        those reports (`dirac_jax._cli`).
    """
    directory = epath.Path(mngr.directory)
    mngr.wait_until_finished()  # this manager's own saves in flight are not partial ones
    step = mngr.latest_step()
    if step is None:
        return template, 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    failure = None
    try:
        restored = mngr.restore(
            step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)})
        )
        state = restored[STATE_ITEM]
    except Exception as e:
        # orbax and tensorstore raise many types here (ValueError, FileNotFoundError, ...),
        # tensorstore with its whole JSON spec attached: keep the first part.
        reason = (str(e).splitlines() or [""])[0].split(" [tensorstore_spec")[0]
        reason = reason if len(reason) <= 300 else reason[:297] + "..."
        failure = f"{type(e).__name__}: {reason}"
    if failure is not None:
        raise CheckpointError(
            f"the checkpoint {directory / str(step)} cannot be restored: it is corrupt, "
            f"partial, or from a different model or config ({failure}). It is left "
            "untouched: move or delete that step directory to resume from an earlier "
            "checkpoint, or start a new --workdir."
        )
    return state, int(step)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data: Any = None) -> None:
    """Saves `state`, and the input position `data`, as checkpoint `step`.

    The caller must have checked `state` is finite (`all_finite`): a checkpoint
    is only written for a good state.

    Args:
      mngr: from `create_manager`.
      step: the training step.
      state: the pytree to save (asynchronously if the manager is async).
      data: None, or the input's `TrainBatches` (`dirac_jax.input_pipeline`).
        With a Grain iterator (`data.checkpoint_item`), its state is saved as
        item `data` (`grain.checkpoint.CheckpointSave`: one small JSON file per
        process, written before this returns, so it is the position at `step`)
        and `data.origin` as item `data_origin`.
    """
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if data is not None and data.checkpoint_item is not None:
        import grain

        items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data.checkpoint_item)
        items[DATA_ORIGIN_ITEM] = ocp.args.JsonSave(data.origin)
    mngr.save(step, args=ocp.args.Composite(**items), force=True)


def restore_data(mngr: ocp.CheckpointManager, step: int, batches: Any) -> bool:
    """Places `batches` at the input position saved with checkpoint `step`.

    Grain restores its iterator's own state (`set_state`, for any number of
    worker processes) into the iterator `batches.prepare_restore` rebuilds from
    the saved `data_origin`.

    Args:
      mngr: from `create_manager`.
      step: a finished checkpoint's step.
      batches: the input's `TrainBatches`, not yet started.

    Returns:
      True if restored; False if the checkpoint holds no input position that
      fits (a device-resident run, another number of processes or of Grain
      workers), in which case the caller places the input by the step (`seek`).

    Raises:
      CheckpointError: the saved position exists but cannot be read.
    """
    if batches.origin is None:  # device-resident: the step alone places the input
        return False
    import grain  # only streamed inputs have a position (an accelerator host may lack Grain)

    step_dir = epath.Path(mngr.directory) / str(step)
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not (step_dir / DATA_ITEM / name).exists() or not (step_dir / DATA_ORIGIN_ITEM).exists():
        return False
    try:
        origin = mngr.restore(
            step, args=ocp.args.Composite(**{DATA_ORIGIN_ITEM: ocp.args.JsonRestore()})
        )[DATA_ORIGIN_ITEM]
        if not batches.prepare_restore(dict(origin), step):
            return False
        restore = grain.checkpoint.CheckpointRestore(batches.checkpoint_item)
        mngr.restore(step, args=ocp.args.Composite(**{DATA_ITEM: restore}))
    except Exception as e:
        raise CheckpointError(
            f"the input position {step_dir / DATA_ITEM / name} cannot be restored "
            f"({type(e).__name__}: {e}). Move or delete the step directory "
            f"{step_dir} to resume from an earlier checkpoint, or start a new --workdir."
        ) from None
    return True


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of `tree` is free of NaN and Inf.

    Works on replicated global arrays in multi-process runs (the reduction is
    jitted, and its replicated result is read from this process's copy).
    """
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return True
    ok = _all_finite(leaves)
    return bool(np.asarray(ok.addressable_data(0)) if isinstance(ok, jax.Array) else ok)


@jax.jit
def _all_finite(leaves):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


class PreemptionSignal:
    """Context manager that turns SIGTERM into a flag (`requested`) for the training loop.

    The first SIGTERM sets the flag and restores the previous handler, so a second
    SIGTERM terminates as usual. Outside the main thread (where Python cannot
    install signal handlers) the flag is never set. The handler is removed on exit.

    Example (the training loop)::

      with PreemptionSignal() as preemption:
          for step in steps:
              ...
              if preemption.requested:
                  save(mngr, step, state)
                  break
    """

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = signum
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        del frame
        self.requested = True
        signal.signal(signum, self._previous)

    def __enter__(self) -> PreemptionSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self.signum, self._previous)
            self._previous = None


class Preemption:
    """Whether training should save and stop at a step, the same answer on every process.

    Use as a context manager around the training loop and call `reached(step)`
    at every step, on every process, with the same steps.

    Multi-process (`jax.distributed`): JAX's preemption service catches SIGTERM
    on any process and agrees on a step; `reached` is orbax's
    `CheckpointManager.reached_preemption`, True on all processes at that step.
    Single process: SIGTERM sets a flag (`PreemptionSignal`) and `reached` is
    True from the next step on.

    Args:
      mngr: the run's checkpoint manager.
    """

    def __init__(self, mngr: ocp.CheckpointManager):
        self._mngr = mngr
        self._signal = PreemptionSignal() if jax.process_count() == 1 else None

    def __enter__(self) -> Preemption:
        if self._signal is not None:
            self._signal.__enter__()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._signal is not None:
            self._signal.__exit__(*exc_info)

    def reached(self, step: int) -> bool:
        if self._signal is not None:
            return self._signal.requested
        return bool(self._mngr.reached_preemption(step))
