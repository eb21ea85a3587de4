r"""Command line: `python -m dirac_jax.reproduce NAME --preset=PRESET --out=DIR`.

  python -m dirac_jax.reproduce depth --preset=cpu --out=runs/reproduce
  python -m dirac_jax.reproduce all --preset=smoke --out=/tmp/smoke

NAME is an experiment (`depth`, `scales`, `init`, `plainnet`, `symmetric`) or
`all`. Prints a line per run (which cell, how many are left), each run's
progress bar, and at the end the table of `DIR/NAME.md`. Exit status 1 with one
`error: ...` line for an unknown experiment or preset, missing data, or an
unusable checkpoint.
"""

from __future__ import annotations

import argparse
import logging as std_logging
import pathlib
import sys


def _parse(argv):
    from dirac_jax.reproduce import EXPERIMENTS, PRESETS

    p = argparse.ArgumentParser(
        prog="python -m dirac_jax.reproduce", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("name", help=f"one of {sorted(EXPERIMENTS)} or 'all'.")
    p.add_argument("--preset", default="cpu", help=f"one of {PRESETS} (default cpu).")
    p.add_argument("--out", default="runs/reproduce", help="output folder.")
    p.add_argument(
        "--configs",
        default=None,
        help="config folder (default: the configs/ folder of this source tree).",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the runs that have finished so far.",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    from absl import logging

    from dirac_jax import checkpoint, config_schema, data, metrics, reproduce

    # This package's INFO lines (one per log step and eval) and everyone's warnings.
    logging.set_verbosity(logging.INFO)
    std_logging.getLogger("absl").addFilter(metrics.own_info_only)
    names = sorted(reproduce.EXPERIMENTS) if args.name == "all" else [args.name]
    configs = pathlib.Path(args.configs) if args.configs else None
    expected = (
        ValueError,
        data.DataNotFoundError,
        checkpoint.CheckpointError,
        config_schema.ConfigError,
    )
    for name in names:
        try:
            report = reproduce.run(name, args.preset, args.out, configs, args.report_only)
        except expected as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        if report is None:
            return 0
        print((pathlib.Path(args.out) / f"{name}.md").read_text(), flush=True)
    return 0


if __name__ == "__main__":
    from dirac_jax import xla_cpu

    xla_cpu.apply()  # before JAX starts its CPU backend
    sys.exit(main())
