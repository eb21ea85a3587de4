"""XLA:CPU flags the command lines set on jaxlib versions with known CPU defects.

jaxlib 0.10.2 and 0.11.0 offload many CPU fusions to YNNPACK (`__ynn_fusion`).
Those fusions crash or hang on an Eigen worker thread for some reductions
(jax-ml/jax#39257, #40412): the process dies with "Fatal Python error: Aborted",
or a step waits forever with every thread idle, and the Python traceback lands
wherever the main thread happens to be. Turning YNNPACK fusions off
(`--xla_cpu_experimental_ynn_fusion_type=`, empty) removes that code path, and
on this project's convolutional steps it is also faster (BENCHMARKS.md,
`python -m benchmarks cpu_flags`).

The command lines (`main`, `evaluate`, `export`, `reproduce`; `benchmarks` from a checkout) and the
test harness call `apply()` before JAX starts its CPU backend. Importing the
library sets nothing. The flags are appended to the user's `XLA_FLAGS`, never
replacing them; a flag the user already set keeps the user's value; and
`DIRAC_JAX_XLA_CPU_FLAGS=0` turns the whole thing off.

XLA aborts the process on a flag it does not know, so the flags are set only on
the jaxlib versions they were checked on (`AFFECTED_JAXLIB`).
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping

__all__ = ["AFFECTED_JAXLIB", "CPU_FLAGS", "OPT_OUT", "apply", "flags_for", "with_flags"]

# YNNPACK fusions off: the defective code path of jax-ml/jax#39257 and #40412.
#: The CPU backend flags `apply` sets on an affected jaxlib (YNNPACK fusions off).
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
# [first, last] jaxlib (major, minor, patch) the upstream reports name, both included.
#: The first and last jaxlib version, both included, that get `CPU_FLAGS`.
AFFECTED_JAXLIB = ((0, 10, 2), (0, 11, 99))
#: Environment variable that turns the flags off when set to 0.
OPT_OUT = "DIRAC_JAX_XLA_CPU_FLAGS"


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def flags_for(jaxlib_version: str | None) -> tuple[str, ...]:
    """The flags to set on `jaxlib_version` (None: jaxlib is not installed).

    Examples:
      >>> flags_for("0.10.2")
      ('--xla_cpu_experimental_ynn_fusion_type=',)
      >>> flags_for("0.10.1"), flags_for("0.12.0"), flags_for(None)
      ((), (), ())
    """
    if jaxlib_version is None:
        return ()
    first, last = AFFECTED_JAXLIB
    return CPU_FLAGS if first <= _version_tuple(jaxlib_version) <= last else ()


def with_flags(xla_flags: str, flags: tuple[str, ...]) -> str:
    """`xla_flags` with each of `flags` appended, unless the user set that flag already.

    Examples:
      >>> with_flags("", ("--a=",))
      '--a='
      >>> with_flags("--x=1", ("--a=",))
      '--x=1 --a='
      >>> with_flags("--a=yes --x=1", ("--a=",))  # the user's value wins
      '--a=yes --x=1'
    """
    present = {f.split("=", 1)[0] for f in xla_flags.split()}
    extra = [f for f in flags if f.split("=", 1)[0] not in present]
    return " ".join([*xla_flags.split(), *extra])


def _installed_jaxlib() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return None


def apply(environ: MutableMapping[str, str] | None = None) -> tuple[str, ...]:
    """Adds the flags for the installed jaxlib to `environ["XLA_FLAGS"]`.

    Call it before JAX creates its CPU backend (the first computation or
    `jax.devices()`); importing JAX is fine. Returns the flags now in force
    from this module (empty when none apply or `DIRAC_JAX_XLA_CPU_FLAGS=0`).
    """
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT, "1") == "0":
        return ()
    flags = flags_for(_installed_jaxlib())
    if flags:
        environ["XLA_FLAGS"] = with_flags(environ.get("XLA_FLAGS", ""), flags)
    return flags
