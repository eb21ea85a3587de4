"""What the command lines (`main`, `evaluate`, `export`) share around their work.

Nothing here runs at import: a command line defines its absl flags when it
runs (`run_command`), so a program with its own flags can import and call
any of dirac_jax.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from absl import app, flags

T = TypeVar("T")

_DEFINED: dict[str, Any] = {}


def define_once(key: str, define: Callable[[], T]) -> T:
    """`define()`'s flag holders, defined in absl's FLAGS on the first call for `key` only.

    absl keeps one flag of a name per process; the commands share `--workdir`
    and `--verbose`, and tests run several commands in one process.
    """
    holders = _DEFINED.get(key)
    values = holders.values() if isinstance(holders, dict) else holders
    # absl's flagsaver (tests) drops the flags defined inside it when it restores FLAGS.
    if holders is None or any(h.name not in flags.FLAGS for h in values):
        _DEFINED[key] = define()
    return _DEFINED[key]


def shared_flags() -> tuple[flags.FlagHolder, flags.FlagHolder]:
    """`(--workdir, --verbose)`, the flags every command line takes."""

    def define():
        workdir = flags.DEFINE_string(
            "workdir",
            None,
            "The run's folder, local or gs://BUCKET/...: where main trains (default "
            "runs/<config name>); the training workdir (config.json, checkpoints/) that "
            "evaluate and export read.",
        )
        verbose = flags.DEFINE_bool(
            "verbose",
            False,
            "Also print other libraries' INFO logs (orbax's checkpoint stages, jax's backend "
            "probes), for debugging; --verbosity=N does too.",
        )
        return workdir, verbose

    return define_once("_cli", define)


def one_line(text: str) -> str:
    """`text` with its lines joined: an error message on one line."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def parse_flags(name: str, argv: list[str]) -> list[str]:
    """absl's FLAGS parsed from `argv`; a flag absl refuses exits with one `error: ...` line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{one_line(e)}; run python -m {name} --help for its flags.")


def call_main(name: str, main: Callable[[list[str]], T], args: list[str]) -> T:
    """`main(args)`, with a `UsageError` as one `error: ...` line instead of the usage text."""
    try:
        return main(args)
    except app.UsageError as e:
        fail(f"{e} (run python -m {name} --help for its flags)")


def run_command(
    name: str,
    main: Callable[[list[str]], Any],
    define_flags: Callable[[], Any],
    argv: list[str] | None = None,
    *,
    parse: Callable[[list[str]], list[str]] | None = None,
) -> None:
    """Runs the absl command line `python -m NAME`: defines its flags, parses, calls `main`.

    Args:
      name: the module, for the messages (`dirac_jax.evaluate`).
      main: what runs on the arguments left after the flags.
      define_flags: defines the command's flags (once per process).
      argv: the command line; None: `sys.argv`.
      parse: the command's own flag parser; None: `parse_flags`.
    """
    define_flags()
    app.run(
        lambda args: call_main(name, main, args),
        argv=argv,
        flags_parser=parse or (lambda args: parse_flags(name, args)),
    )


def quiet_logs() -> None:
    """Keeps this package's INFO logs and everyone's warnings, unless --verbose/--verbosity.

    absl's handler prints every library's INFO records (orbax logs each stage
    of a checkpoint save); `metrics.own_info_only` keeps only ours.
    """
    from absl import logging as absl_logging

    from dirac_jax import metrics

    _, verbose = shared_flags()
    if verbose.value or flags.FLAGS["verbosity"].present:
        return
    absl_logging.get_absl_handler().addFilter(metrics.own_info_only)


def fail(error: BaseException | str) -> NoReturn:
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


def check_config_file(value: str) -> None:
    """Raises a ValueError that says what to do if `PATH.py[:PRESET]` cannot be a config.

    The file must exist, and a `:PRESET` needs a `get_config` that takes one
    (read from the file's syntax, nothing is run).

    Examples:
      >>> from dirac_jax import configs
      >>> check_config_file(f"{configs.path('cifar_wrn_symmetric')}:soft")
      >>> check_config_file(f"{configs.path('cifar_dirac')}:big")
      Traceback (most recent call last):
      ValueError: --config=...cifar_dirac.py:big: this config has no variants; drop ':big'.
    """
    name, colon, preset = value.partition(":")
    path = os.path.expanduser(name)
    if not os.path.isfile(path):
        raise ValueError(
            f"--config={value}: no such file {path!r}; give a config file or a shipped config's "
            "name (e.g. --config=fashion_mnist_dirac)."
        )
    if not colon:
        return
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (SyntaxError, UnicodeDecodeError):
        return  # the config loader reports it
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "get_config":
            args = node.args
            if not (args.args or args.posonlyargs or args.vararg):
                raise ValueError(
                    f"--config={value}: this config has no variants; drop ':{preset}'."
                )


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


class _DropQuantizerAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        source = record.pathname.replace(os.sep, "/")
        return not ("onnxruntime/quantization/" in source and record.levelno <= logging.WARNING)


@contextlib.contextmanager
def quantizer_chatter_hidden():
    """Hides what onnxruntime's quantizer prints on a successful run, unless --verbose.

    It prints its calibration progress to stdout and advises pre-processing
    (shape inference, graph optimization) at WARNING; the exported graph
    needs neither, and the lines would bury the command's one result line.
    Errors still raise.
    """
    _, verbose = shared_flags()
    if verbose.value:
        yield
        return
    from absl import logging as absl_logging

    handler, record_filter = absl_logging.get_absl_handler(), _DropQuantizerAdvice()
    handler.addFilter(record_filter)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        handler.removeFilter(record_filter)


def run_workdir_command(argv: list[str], work: Callable[[], T]) -> T:
    """Runs `work()` for a command line that takes flags only and needs `--workdir`.

    Quiets other libraries' INFO logs (`quiet_logs`) and orbax's echoes of a
    failed restore (`orbax_echoes_dropped`), and turns a user error into one
    line on stderr and exit status 1.
    """
    from dirac_jax.checkpoint import CheckpointError

    workdir, _ = shared_flags()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if workdir.value is None:
        raise app.UsageError("--workdir is required: the training run to read.")
    quiet_logs()
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
