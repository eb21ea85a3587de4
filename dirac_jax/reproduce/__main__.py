r"""Command line: `python -m dirac_jax.reproduce NAME [--preset=PRESET] [--out=DIR]`.

  python -m dirac_jax.reproduce depth --preset=cpu --out=runs/reproduce
  python -m dirac_jax.reproduce all --preset=smoke --out=/tmp/smoke

NAME is an experiment (`depth`, `scales`, `init`, `plainnet`, `symmetric`) or
`all`. Prints a line per run (which cell, how many are left), each run's
progress bar, and at the end the table of `DIR/NAME.md`. Exit status 1 with one
`error: ...` line for an unknown experiment or preset, missing data, or an
unusable checkpoint. Other libraries' INFO logs (orbax's checkpoint stages)
are hidden; `--verbose` shows them.
"""

from __future__ import annotations

import logging as std_logging
import pathlib
import sys

from absl import app, flags

_FLAGS: dict = {}


def _define_flags() -> dict:
    """The command line's flags, defined in absl's FLAGS when it runs (once per process)."""
    if not _FLAGS:
        _FLAGS.update(_new_flags())
    return _FLAGS


def _new_flags() -> dict:
    return {
        "preset": flags.DEFINE_string(
            "preset", "cpu", "How big the runs are: smoke, cpu or paper."
        ),
        "out": flags.DEFINE_string("out", "runs/reproduce", "Output folder."),
        "configs": flags.DEFINE_string(
            "configs",
            None,
            "Config folder (default: the configs shipped with the package, dirac_jax.configs).",
        ),
        "report_only": flags.DEFINE_bool(
            "report_only", False, "Train nothing: report the runs that have finished so far."
        ),
        "verbose": flags.DEFINE_bool(
            "verbose", False, "Also print other libraries' INFO logs (orbax, jax), for debugging."
        ),
    }


def main(argv) -> int:
    from dirac_jax import reproduce

    f = {name: holder.value for name, holder in _define_flags().items()}
    if len(argv) != 2:
        print(
            f"error: give one experiment, one of {sorted(reproduce.EXPERIMENTS)} or all "
            "(python -m dirac_jax.reproduce NAME --preset=smoke).",
            file=sys.stderr,
            flush=True,
        )
        return 1
    from absl import logging

    from dirac_jax import checkpoint, config_schema, data, metrics

    # This package's INFO lines (one per log step and eval) and everyone's warnings.
    logging.set_verbosity(logging.INFO)
    if not f["verbose"]:
        std_logging.getLogger("absl").addFilter(metrics.own_info_only)
    names = sorted(reproduce.EXPERIMENTS) if argv[1] == "all" else [argv[1]]
    configs = pathlib.Path(f["configs"]) if f["configs"] else None
    expected = (
        ValueError,
        data.DataNotFoundError,
        checkpoint.CheckpointError,
        config_schema.ConfigError,
    )
    for name in names:
        try:
            report = reproduce.run(name, f["preset"], f["out"], configs, f["report_only"])
        except expected as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return 1
        if report is None:
            return 0
        print((pathlib.Path(f["out"]) / f"{name}.md").read_text(), flush=True)
    return 0


def _parse(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = " ".join(str(e).split())
        print(
            f"error: {message}; run python -m dirac_jax.reproduce --help for its flags.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    from dirac_jax import xla_cpu

    xla_cpu.apply()  # before JAX starts its CPU backend
    _define_flags()
    app.run(main, flags_parser=_parse)
