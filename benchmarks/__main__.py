"""Entry point: `python -m benchmarks SUITE [--flag=value ...]`, SUITE one of `_SUITES`.

The suite is the first word; the rest are its absl flags (`--half_precision`,
`--depth=10` or `--depth 10`), and `python -m benchmarks SUITE --help`
lists them.
"""

import importlib
import sys

_SUITES = (
    "bf16",
    "compile",
    "cpu_flags",
    "deploy",
    "device_check",
    "fold_latency",
    "input",
    "int8",
    "train",
)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _SUITES:
        usage = f"usage: python -m benchmarks {{{','.join(_SUITES)}}} [--flag=value ...]"
        asked = argv[:1] in (["--help"], ["-h"])
        print(
            f"{usage}\npython -m benchmarks SUITE --help lists a suite's flags.",
            file=sys.stdout if asked else sys.stderr,
        )
        return 0 if asked else 2
    from dirac_jax import xla_cpu

    xla_cpu.apply()
    suite = importlib.import_module(f"benchmarks.{argv[0]}")
    return suite.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
