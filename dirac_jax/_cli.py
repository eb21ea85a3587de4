"""What the command lines (`main`, `evaluate`, `export`) share around their work."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar

from absl import app, flags

T = TypeVar("T")

# The flag `main`, `evaluate` and `export` share (absl keeps one flag of a name per process).
WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "The run's folder, local or gs://BUCKET/...: where main trains (default runs/<config "
    "name>); the training workdir (config.json, checkpoints/) that evaluate and export read.",
)


def fail(error: BaseException) -> NoReturn:
    """Exits with status 1 and the error on stderr, without a traceback."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(1)


def config_path(value: str) -> str:
    """A `--config` value with a shipped config's name replaced by its file's path.

    A value that names a file (it ends in `.py` or has a folder) is kept, with
    its `:PRESET`; a bare name is a config of `dirac_jax.configs`.

    Examples:
      >>> config_path("configs/cifar_dirac.py:runlocal")
      'configs/cifar_dirac.py:runlocal'
      >>> config_path("cifar_wrn_symmetric:soft").endswith("/cifar_wrn_symmetric.py:soft")
      True
      >>> config_path("cifar_dirak")
      Traceback (most recent call last):
      ValueError: --config=cifar_dirak is no PATH.py and no shipped config 'cifar_dirak'; one of ...
    """
    name, colon, preset = value.partition(":")
    if name.endswith(".py") or "/" in name or os.sep in name:
        return value
    from dirac_jax import configs

    try:
        return f"{configs.path(name)}{colon}{preset}"
    except ValueError as e:
        raise ValueError(f"--config={value} is no PATH.py and {e}") from None


def with_config_paths(argv: list[str], flag: str = "config") -> list[str]:
    """`argv` with `--FLAG=NAME[:PRESET]` (or `--FLAG NAME`) turned into a path.

    Examples:
      >>> with_config_paths(["main", "--config", "x/y.py", "--config.seed=1"])
      ['main', '--config', 'x/y.py', '--config.seed=1']
      >>> with_config_paths(["main", "--config=plainnet"])[1].endswith("/plainnet.py")
      True
    """
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith(f"--{flag}="):
            out[i] = f"--{flag}={config_path(arg.split('=', 1)[1])}"
        elif arg == f"--{flag}" and i + 1 < len(out):
            out[i + 1] = config_path(out[i + 1])
    return out


def run_workdir_command(argv: list[str], work: Callable[[], T]) -> T:
    """Runs `work()` for an absl command line that takes flags only and needs `--workdir`.

    Quiets orbax (it logs every restore stage at INFO, and a failed restore
    echoes from its threads: `orbax_echoes_dropped`) and turns a user error
    into one line on stderr and exit status 1.
    """
    from absl import logging as absl_logging

    from dirac_jax.checkpoint import CheckpointError

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if WORKDIR.value is None:
        raise app.UsageError("--workdir is required: the training run to read.")
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        with orbax_echoes_dropped():
            return work()
    # The errors a user can cause and fix: a wrong path or flag, a missing optional
    # dependency, a corrupt checkpoint. Anything else is a bug and keeps its traceback.
    except (OSError, ValueError, ImportError, CheckpointError) as e:
        fail(e)


def _is_closed_loop(exc: BaseException | None) -> bool:
    return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


class _DropClosedLoopRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (_is_closed_loop(exc) or "exception was never retrieved" in str(record.msg))


@contextlib.contextmanager
def orbax_echoes_dropped(settle_s: float = 0.2, limit_s: float = 5.0):
    """Drops the echoes of a failed orbax restore, while a command runs and settles.

    The cause is in orbax: it runs a restore's reads on a fresh asyncio loop and
    closes that loop as soon as the first read fails, while the other reads
    (tensorstore futures) are still in flight. Each of them then reports
    `RuntimeError('Event loop is closed')` from a tensorstore thread (an
    unraisable exception or a thread's exception) and asyncio logs "Future
    exception was never retrieved"; all of it would bury the one
    `CheckpointError`. This drops exactly those reports, and only until the
    abandoned reads have settled (no echo for `settle_s`, at most `limit_s`
    after a failure); then the previous hooks are back.

    It replaces `sys.unraisablehook` and `threading.excepthook` for its
    duration, so only the command lines use it, around their whole work: a
    library does not touch the process's hooks.
    """
    previous_unraisable, previous_thread = sys.unraisablehook, threading.excepthook
    last_echo = [time.monotonic()]

    def unraisable_hook(unraisable):
        if _is_closed_loop(unraisable.exc_value):
            last_echo[0] = time.monotonic()
        else:
            previous_unraisable(unraisable)

    def thread_hook(args):
        if _is_closed_loop(args.exc_value):
            last_echo[0] = time.monotonic()
        else:
            previous_thread(args)

    record_filter = _DropClosedLoopRecords()
    loggers = [logging.getLogger(name) for name in ("asyncio", "concurrent.futures")]
    sys.unraisablehook, threading.excepthook = unraisable_hook, thread_hook
    for logger in loggers:
        logger.addFilter(record_filter)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        if failed:
            deadline = time.monotonic() + limit_s
            last_echo[0] = time.monotonic()
            while time.monotonic() - last_echo[0] < settle_s and time.monotonic() < deadline:
                gc.collect()
                time.sleep(settle_s / 4)
        sys.unraisablehook, threading.excepthook = previous_unraisable, previous_thread
        for logger in loggers:
            logger.removeFilter(record_filter)
