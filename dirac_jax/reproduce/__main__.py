r"""Command line: `python -m dirac_jax.reproduce NAME [--preset=PRESET] [--out=DIR]`.

  python -m dirac_jax.reproduce depth --preset=cpu --out=runs/reproduce
  python -m dirac_jax.reproduce all --preset=smoke --out=/tmp/smoke

NAME is an experiment (`depth`, `scales`, `init`, `plainnet`, `symmetric`) or
`all`. Prints a line per run (which cell, how many are left), each run's
progress bar, and at the end the table of `DIR/NAME.md`. Exit status 1 with one
`error: ...` line for an unknown experiment or preset, missing data, or an
unusable checkpoint.
"""

from __future__ import annotations

import logging as std_logging
import pathlib
import sys

from absl import app, flags

_PRESET = flags.DEFINE_string("preset", "cpu", "How big the runs are: smoke, cpu or paper.")
_OUT = flags.DEFINE_string("out", "runs/reproduce", "Output folder.")
_CONFIGS = flags.DEFINE_string(
    "configs",
    None,
    "Config folder (default: the configs shipped with the package, dirac_jax.configs).",
)
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Train nothing: report the runs that have finished so far."
)


def main(argv) -> int:
    from dirac_jax import reproduce

    if len(argv) != 2:
        raise app.UsageError(f"give one experiment, one of {sorted(reproduce.EXPERIMENTS)} or all.")
    from absl import logging

    from dirac_jax import checkpoint, config_schema, data, metrics

    # This package's INFO lines (one per log step and eval) and everyone's warnings.
    logging.set_verbosity(logging.INFO)
    std_logging.getLogger("absl").addFilter(metrics.own_info_only)
    names = sorted(reproduce.EXPERIMENTS) if argv[1] == "all" else [argv[1]]
    configs = pathlib.Path(_CONFIGS.value) if _CONFIGS.value else None
    expected = (
        ValueError,
        data.DataNotFoundError,
        checkpoint.CheckpointError,
        config_schema.ConfigError,
    )
    for name in names:
        try:
            report = reproduce.run(name, _PRESET.value, _OUT.value, configs, _REPORT_ONLY.value)
        except expected as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        if report is None:
            return 0
        print((pathlib.Path(_OUT.value) / f"{name}.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    from dirac_jax import xla_cpu

    xla_cpu.apply()  # before JAX starts its CPU backend
    app.run(main)
