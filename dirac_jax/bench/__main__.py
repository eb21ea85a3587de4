"""Entry point: `python -m dirac_jax.bench SUITE [--flags]`, SUITE one of `_SUITES`."""

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
        print(f"usage: python -m dirac_jax.bench {{{','.join(_SUITES)}}} [--help]", file=sys.stderr)
        return 2
    from dirac_jax import xla_cpu

    xla_cpu.apply()
    suite = importlib.import_module(f"dirac_jax.bench.{argv[0]}")
    return suite.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
