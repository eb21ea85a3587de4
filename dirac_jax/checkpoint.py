"""Checkpoints of the training state: save, resume, preemption and the two failure modes.

An orbax `CheckpointManager` keeps the last `keep` checkpoints under
`workdir/checkpoints/<step>`. A checkpoint is the whole `TrainState` pytree:
`step`, `params`, `opt_state` (the momentum buffers and the schedule count) and
`batch_stats`. There is no RNG state to save: the trainer derives every random
number from `(config.seed, step)` and the data order from `(config.seed, epoch)`,
so the step alone fixes where a resumed run continues.

Failure modes, each one exception with one message that says what to do:

* `CheckpointError`: a checkpoint that cannot be restored (corrupt, partial or
  from a different model), or a directory under `checkpoints/` that is not a
  finished checkpoint (an interrupted save). Nothing is deleted or overwritten;
  the message names the directory to move away.
* `NonFiniteLossError`: training produced a NaN or Inf. The trainer checks the
  state is finite before every save, so the last checkpoint stays a good one.

Preemption: `PreemptionSignal` turns SIGTERM into a flag that the training loop
polls; the loop then saves at the current step and returns.

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

import logging
import pathlib
import signal
import sys
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "CHECKPOINT_DIR",
    "CheckpointError",
    "NonFiniteLossError",
    "PreemptionSignal",
    "all_finite",
    "checkpoint_dir",
    "create_manager",
    "restore_latest",
    "save",
]

CHECKPOINT_DIR = "checkpoints"
# orbax writes a checkpoint into "<step>.orbax-checkpoint-tmp..." and renames it when done.
_TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names it and what to do."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or Inf; the message names the step and the last good checkpoint."""


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    """The directory holding the step directories of a run."""
    return pathlib.Path(workdir).absolute() / CHECKPOINT_DIR


def create_manager(
    workdir: str | pathlib.Path, *, keep: int = 3, async_save: bool = True
) -> ocp.CheckpointManager:
    """An orbax `CheckpointManager` for `workdir/checkpoints`, keeping the last `keep` steps.

    The caller decides when to save (`save`), so no save interval is set here.

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
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    try:
        return ocp.CheckpointManager(directory, options=options)
    except Exception as e:
        raise CheckpointError(
            f"cannot open the checkpoint directory {directory} ({type(e).__name__}: {e}). "
            "Fix or move it away, or start a new --workdir."
        ) from e


def _unfinished_entries(mngr: ocp.CheckpointManager) -> list[pathlib.Path]:
    """Directories under the checkpoint dir that are not finished checkpoints."""
    directory = pathlib.Path(mngr.directory)
    steps = {str(s) for s in mngr.all_steps()}
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_dir() and (_TMP_MARKER in p.name or (p.name.isdigit() and p.name not in steps))
    )


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
      CheckpointError: the latest checkpoint cannot be restored, or an unfinished
        save was left in the directory. The message names the step directory and
        what to do; nothing is deleted.
    """
    directory = pathlib.Path(mngr.directory)
    mngr.wait_until_finished()  # this manager's own saves in flight are not partial ones
    unfinished = _unfinished_entries(mngr)
    if unfinished:
        raise CheckpointError(
            f"{unfinished[0]} is a partial checkpoint (an interrupted save?). It is left "
            "untouched: move or delete it to resume from the latest complete checkpoint, or "
            "start a new --workdir."
        )
    step = mngr.latest_step()
    if step is None:
        return template, 0
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    failure = None
    # Before the attempt: a failing restore's background reports can come at any time.
    _ignore_closed_loop_reports()
    try:
        state = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
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


def _is_closed_loop(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _drop_closed_loop_record(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (_is_closed_loop(exc) or "exception was never retrieved" in str(record.msg))


def _ignore_closed_loop_reports() -> None:
    """Silences the echoes of a failed restore, for the rest of the process.

    A failed restore leaves orbax futures behind. Their callbacks, hitting orbax's
    closed event loop, report `RuntimeError('Event loop is closed')` through
    whichever channel runs them (an unraisable-exception hook, a thread's
    excepthook, or the `concurrent.futures` / `asyncio` loggers), and asyncio logs
    "Future exception was never retrieved" with the same error; all of them would
    bury the one `CheckpointError` message. Only these reports are dropped.
    """
    if getattr(sys.unraisablehook, "_drops_closed_loop", False):
        return
    previous_unraisable, previous_thread = sys.unraisablehook, threading.excepthook

    def unraisable_hook(unraisable):
        if not _is_closed_loop(unraisable.exc_value):
            previous_unraisable(unraisable)

    def thread_hook(args):
        if not _is_closed_loop(args.exc_value):
            previous_thread(args)

    unraisable_hook._drops_closed_loop = True
    sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook
    for name in ("asyncio", "concurrent.futures"):
        logging.getLogger(name).addFilter(_drop_closed_loop_record)


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Saves `state` as checkpoint `step` (asynchronously if the manager is async).

    The caller must have checked `state` is finite (`all_finite`): a checkpoint
    is only written for a good state.
    """
    mngr.save(step, args=ocp.args.StandardSave(state), force=True)


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
