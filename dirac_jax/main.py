r"""Command line: train and evaluate one config, resuming from its workdir.

  python -m dirac_jax.main --config=configs/fashion_mnist_dirac.py \
      --config.num_train_steps=300 [--workdir=runs/fashion_mnist_dirac]

`--config` takes a config file, or one shipped with the package by name
(`--config=fashion_mnist_dirac`, `--config=cifar_wrn_symmetric:soft`: the
files of configs/, installed as `dirac_jax.configs`), so an installed wheel
runs them without the source tree. Any config field can be overridden with
`--config.FIELD=VALUE` (the config is locked, so a misspelt field is an
error that names the field meant). Rerunning the same command resumes from
the latest checkpoint in the workdir. A bad flag or config, missing data, an
unusable checkpoint or a diverged run exits with status 1 and one `error: ...`
line on stderr; a SIGTERM saves a checkpoint and exits with status 0.

A run prints its summary line, one line per `config.log_every_steps` (with a
progress bar on a terminal), the eval lines and a final `done: ...` line.
Other libraries' INFO logs (orbax's checkpoint stages, jax's backend probes)
are hidden; `--verbose` (or absl's `--verbosity=0`) shows them, for debugging.
The same holds for `dirac_jax.evaluate` and `dirac_jax.export`.
The workdir may be in a bucket, `--workdir=gs://BUCKET/runs/NAME` (the `gcs`
extra: `pip install 'dirac_jax[gcs]'`), which every host of a pod reads and
writes alike.

Multi-host, one process per host, the same command on every host:

* `--multihost` (or DIRAC_JAX_MULTIHOST=1): `jax.distributed.initialize()` reads
  the cluster from the environment (Cloud TPU pods, SLURM, GPU clusters that set
  JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
* `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`: anything
  else, e.g. several GPU hosts, or two processes on one machine:

    python -m dirac_jax.main --config=... --coordinator_address=10.0.0.1:1234 \
        --num_processes=2 --process_id=0   # and --process_id=1 on the other host

On CPU the processes' collectives go through gloo.
"""

from __future__ import annotations

import os
import pathlib
import re
import sys
from typing import NamedTuple

from absl import flags, logging

from dirac_jax import _cli, _paths

__all__ = [
    "default_workdir",
    "main",
    "parse_flags",
    "run",
]


class _Flags(NamedTuple):
    config: flags.FlagHolder
    multihost: flags.FlagHolder
    coordinator: flags.FlagHolder
    num_processes: flags.FlagHolder
    process_id: flags.FlagHolder


def _define_flags() -> _Flags:
    """The command line's flags, defined in absl's FLAGS when it runs (once per process)."""

    def define():
        from ml_collections import config_flags

        _cli.shared_flags()
        flags.declare_key_flag("workdir")
        flags.declare_key_flag("verbose")
        return _Flags(
            config=config_flags.DEFINE_config_file(
                "config",
                None,
                "Training config: a file, PATH.py[:PRESET], or a config shipped with the "
                "package by name, NAME[:PRESET] (e.g. cifar_dirac, fashion_mnist_dirac, "
                "cifar_wrn_symmetric:soft).",
                lock_config=True,
            ),
            multihost=flags.DEFINE_bool(
                "multihost",
                os.environ.get("DIRAC_JAX_MULTIHOST", "") == "1",
                "Call jax.distributed.initialize() first (default from DIRAC_JAX_MULTIHOST=1).",
            ),
            coordinator=flags.DEFINE_string(
                "coordinator_address",
                None,
                "HOST:PORT of process 0's coordination service; with --num_processes and "
                "--process_id starts a multi-process run without cluster auto-detection.",
            ),
            num_processes=flags.DEFINE_integer(
                "num_processes", None, "Processes of the run (>= 1)."
            ),
            process_id=flags.DEFINE_integer("process_id", None, "This process's index, 0-based."),
        )

    return _cli.define_once(__name__, define)


def default_workdir(config_path: str) -> str:
    """`runs/<config file name without .py>`, e.g. runs/cifar_dirac.

    Examples:
      >>> default_workdir("configs/cifar_dirac.py:runlocal")
      'runs/cifar_dirac'
    """
    return str(pathlib.Path("runs") / pathlib.Path(config_path.split(":")[0]).stem)


def _init_distributed() -> None:
    """`jax.distributed.initialize` from the flags; exits with one message on bad flags."""
    f = _define_flags()
    coordinator, num_processes, process_id = (
        f.coordinator.value,
        f.num_processes.value,
        f.process_id.value,
    )
    explicit = {
        "--coordinator_address": coordinator,
        "--num_processes": num_processes,
        "--process_id": process_id,
    }
    given = [name for name, value in explicit.items() if value is not None]
    if not given and not f.multihost.value:
        return
    if given and len(given) < 3:
        missing = ", ".join(name for name in explicit if name not in given)
        _cli.fail(f"{', '.join(given)} also needs {missing} (or use --multihost alone).")
    if given and not 0 <= process_id < num_processes:
        _cli.fail(f"--process_id={process_id} must be in [0, --num_processes={num_processes}).")
    import jax

    # CPU processes need a cross-process collectives backend; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if given:
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d", jax.process_index(), jax.process_count())
    _no_persistent_cache_across_cpu_processes()


def _no_persistent_cache_across_cpu_processes() -> None:
    """Turns JAX's persistent compilation cache off for a multi-process CPU run.

    On CPU, JAX's cache key keeps the program's device assignment (it strips it
    for GPUs only), so the same program gets another key in each process, and
    only process 0 writes the cache. A rerun then loads every program from the
    cache in process 0 and compiles every one in the others (BENCHMARKS.md has
    the count). Process 0 reaches each first collective early by the others'
    compile time, and gloo's context setup waits a fixed 30 s for its peers
    ("Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue()
    timed out"). The run waits for its slowest process, so the cache saves it
    nothing there; off, the processes stay in step.
    """
    import jax

    if jax.process_count() == 1 or jax.default_backend() != "cpu":
        return
    if jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_enable_compilation_cache", False)
        logging.info(
            "persistent compilation cache off: on CPU only process 0 would load from it, and "
            "its early arrival at the first collective times out gloo's 30 s setup"
        )


def _override_error(argv: list[str], error: Exception) -> str:
    """One line for a `--config.FIELD=...` that names no field, with absl's suggestion."""
    text = str(error)
    wrong = re.search(r"'([^'\\]+)\\?'", text)
    wrong_name = wrong.group(1) if wrong else None
    hint = re.search(r'Did you mean "([^"]+)"', text)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[2:].split("=", 1)[0]
        parts = path.split(".")
        if wrong_name in parts:
            if hint:
                fixed = ".".join(hint.group(1) if p == wrong_name else p for p in parts)
                return f"--{path}: the config has no field {wrong_name!r}; did you mean --{fixed}?"
            return (
                f"--{path}: the config has no field {wrong_name!r}; see the config file for its "
                "fields."
            )
    return f"a --config.FIELD override names no field of the config: {_cli.one_line(text)}"


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, after a shipped config's name became its file's path.

    A bad `--config` (a missing file, a variant of a config without variants, a
    field it lacks) or any flag absl refuses exits with one `error: ...` line.
    """
    _define_flags()
    try:
        argv = _cli.with_config_paths(argv)
        for arg in argv:  # `--config PATH` is rewritten in place; read both spellings
            if arg.startswith("--config="):
                _cli.check_config_file(arg.split("=", 1)[1])
        if "--config" in argv[:-1]:
            _cli.check_config_file(argv[argv.index("--config") + 1])
    except ValueError as e:
        _cli.fail(e)
    try:
        return _cli.parse_flags("dirac_jax.main", argv)
    except (AttributeError, KeyError) as e:  # ml_collections: an override names no field
        _cli.fail(_override_error(argv, e))


def main(argv: list[str]) -> None:
    """What `python -m dirac_jax.main` runs once the flags are parsed (`run`)."""
    f = _define_flags()
    if len(argv) > 1:
        _cli.fail(
            f"unexpected arguments: {' '.join(argv[1:])}; every setting is a flag, e.g. "
            "--config.num_train_steps=1000."
        )
    if f.config.value is None:  # checked here, not marked required: one FLAGS per process
        _cli.fail(
            "--config is required: a config file or a shipped config's name, e.g. "
            "--config=fashion_mnist_dirac."
        )
    from ml_collections import config_flags

    from dirac_jax import config_schema
    from dirac_jax.workdir import SUMMARY_FILE

    _cli.quiet_logs()
    _init_distributed()

    from dirac_jax import checkpoint, data, train

    workdir = _cli.shared_flags()[0].value or default_workdir(
        config_flags.get_config_filename(flags.FLAGS["config"])
    )
    expected = (config_schema.ConfigError, data.DataNotFoundError, checkpoint.CheckpointError)
    try:
        _check_workdir(workdir)
        with _cli.orbax_echoes_dropped():
            summary = train.train_and_evaluate(f.config.value, workdir)
    except (*expected, checkpoint.NonFiniteLossError) as e:
        _cli.fail(e)
    if summary.get("preempted"):
        print(f"preempted at step {summary['step']}; rerun the same command to resume", flush=True)
        return
    summary_path = _paths.resolve(workdir) / SUMMARY_FILE
    print(
        f"done: step {summary['step']}, test accuracy {summary['test_top1']:.4f}, "
        f"test loss {summary['test_loss']:.4f}, summary in {summary_path}",
        flush=True,
    )


def _check_workdir(workdir: str) -> None:
    """A ConfigError for a `--workdir` that exists and is not a folder."""
    from dirac_jax import config_schema

    path = _paths.resolve(workdir)
    if not _paths.is_uri(path) and path.exists() and not path.is_dir():
        raise config_schema.ConfigError(
            f"--workdir={workdir} is a file, not a folder; give a new or existing run folder "
            "(or leave --workdir out for runs/<config name>)."
        )


def run(argv: list[str] | None = None) -> None:
    """`python -m dirac_jax.main`: defines the flags, parses `argv` (default sys.argv), trains."""
    from dirac_jax import xla_cpu

    xla_cpu.apply()  # before JAX starts its CPU backend
    _cli.run_command("dirac_jax.main", main, _define_flags, argv, parse=parse_flags)


if __name__ == "__main__":
    run(sys.argv)
