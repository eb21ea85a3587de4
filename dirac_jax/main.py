r"""Command line: train and evaluate one config, resuming from its workdir.

  python -m dirac_jax.main --config=configs/fashion_mnist_dirac.py \
      --config.num_train_steps=300 [--workdir=runs/fashion_mnist_dirac]

`--config` takes a config file, or one shipped with the package by name
(`--config=fashion_mnist_dirac`, `--config=cifar_wrn_symmetric:soft`: the
files of configs/, installed as `dirac_jax.configs`), so an installed wheel
runs them without the source tree. Any config field can be overridden with
`--config.FIELD=VALUE` (the config is locked, so a misspelt field is an
error). Rerunning the same command resumes from the latest checkpoint in the
workdir. A bad config, missing data, an
unusable checkpoint or a diverged run exits with status 1 and one `error: ...`
message on stderr; a SIGTERM saves a checkpoint and exits with status 0.
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

from absl import app, flags, logging
from ml_collections import config_flags

from dirac_jax import _paths
from dirac_jax._cli import WORKDIR, fail, orbax_echoes_dropped, with_config_paths

__all__ = [
    "default_workdir",
    "main",
    "parse_flags",
    "run",
]

_MULTIHOST = flags.DEFINE_bool(
    "multihost",
    os.environ.get("DIRAC_JAX_MULTIHOST", "") == "1",
    "Call jax.distributed.initialize() first (default from DIRAC_JAX_MULTIHOST=1).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "HOST:PORT of process 0's coordination service; with --num_processes and --process_id "
    "starts a multi-process run without cluster auto-detection.",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the run (>= 1).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
flags.declare_key_flag("workdir")  # shared with evaluate and export (_cli); --help lists it
config_flags.DEFINE_config_file(
    "config",
    None,
    "Training config: a file, PATH.py[:PRESET], or a config shipped with the package by name, "
    "NAME[:PRESET] (e.g. cifar_dirac, fashion_mnist_dirac, cifar_wrn_symmetric:soft).",
    lock_config=True,
)


def default_workdir(config_path: str) -> str:
    """`runs/<config file name without .py>`, e.g. runs/cifar_dirac.

    Examples:
      >>> default_workdir("configs/cifar_dirac.py:runlocal")
      'runs/cifar_dirac'
    """
    return str(pathlib.Path("runs") / pathlib.Path(config_path.split(":")[0]).stem)


def _init_distributed() -> None:
    """`jax.distributed.initialize` from the flags; exits with one message on bad flags."""
    explicit = {
        "--coordinator_address": _COORDINATOR.value,
        "--num_processes": _NUM_PROCESSES.value,
        "--process_id": _PROCESS_ID.value,
    }
    given = [name for name, value in explicit.items() if value is not None]
    if not given and not _MULTIHOST.value:
        return
    if given and len(given) < 3:
        missing = ", ".join(name for name in explicit if name not in given)
        fail(ValueError(f"{', '.join(given)} also needs {missing} (or use --multihost alone)."))
    if given and not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
        fail(
            ValueError(
                f"--process_id={_PROCESS_ID.value} must be in [0, --num_processes="
                f"{_NUM_PROCESSES.value})."
            )
        )
    import jax

    # CPU processes need a cross-process collectives backend; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if given:
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d", jax.process_index(), jax.process_count())
    _no_persistent_cache_across_cpu_processes()


def _no_persistent_cache_across_cpu_processes() -> None:
    """Turns JAX's persistent compilation cache off for a multi-process CPU run.

    On CPU, JAX's cache key keeps the program's device assignment (it strips it
    for GPUs only), so the same program gets another key in each process, and
    only process 0 writes the cache. A rerun then loads every program in
    process 0 and compiles every one in the others (measured: 5 of 5 programs
    hit in process 0, none in process 1). Process 0 reaches each first
    collective early by the others' compile time, and gloo's context setup waits
    a fixed 30 s for its peers ("Gloo context initialization failed:
    DEADLINE_EXCEEDED: GetKeyValue() timed out"). The run waits for its slowest
    process, so the cache saves it nothing there; off, the processes stay in step.
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


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, after a shipped config's name became its file's path."""
    try:
        argv = with_config_paths(argv)
    except ValueError as e:
        fail(e)
    return app.parse_flags_with_usage(argv)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if flags.FLAGS.config is None:  # checked here, not marked required: one FLAGS per process
        raise app.UsageError("--config is required: a config file or a shipped config's name.")
    from dirac_jax import config_schema, metrics
    from dirac_jax.workdir import SUMMARY_FILE

    logging.get_absl_handler().addFilter(metrics.own_info_only)
    _init_distributed()

    from dirac_jax import checkpoint, data, train

    config = flags.FLAGS.config
    expected = (config_schema.ConfigError, data.DataNotFoundError, checkpoint.CheckpointError)
    workdir = WORKDIR.value or default_workdir(
        config_flags.get_config_filename(flags.FLAGS["config"])
    )
    try:
        with orbax_echoes_dropped():
            summary = train.train_and_evaluate(config, workdir)
    except (*expected, checkpoint.NonFiniteLossError) as e:
        fail(e)
    if summary.get("preempted"):
        print(f"preempted at step {summary['step']}; rerun the same command to resume", flush=True)
        return
    summary_path = _paths.resolve(workdir) / SUMMARY_FILE
    print(
        f"done: step {summary['step']}, test accuracy {summary['test_accuracy']:.4f}, "
        f"test loss {summary['test_loss']:.4f}, summary in {summary_path}",
        flush=True,
    )


def run() -> None:
    from dirac_jax import xla_cpu

    xla_cpu.apply()  # before JAX starts its CPU backend
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
