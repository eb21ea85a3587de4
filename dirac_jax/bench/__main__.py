"""Entry point: `python -m dirac_jax.bench {bf16,compile,fold,input,train} [--flags]`."""

import importlib
import sys

_SUITES = ("bf16", "compile", "fold", "input", "train")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in _SUITES:
        print(f"usage: python -m dirac_jax.bench {{{','.join(_SUITES)}}} [--help]", file=sys.stderr)
        return 2
    suite = importlib.import_module(f"dirac_jax.bench.{argv[0]}")
    return suite.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
