"""What the workdir command lines (`evaluate`, `export`) share around their work."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

from dirac_jax import train

T = TypeVar("T")

# The errors a user can cause and fix: a wrong path or flag, a missing optional
# dependency, a corrupt checkpoint. Anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, ImportError, train.CheckpointError)


def run_workdir_command(argv: list[str], work: Callable[[], T]) -> T:
    """Runs `work()` for an absl command line that takes flags only.

    Quiets orbax (it logs every restore stage at INFO) and turns a user error
    into one line on stderr and exit status 1.
    """
    from absl import app, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    try:
        return work()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
