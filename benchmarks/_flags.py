"""The benchmark suites' absl flags: each suite's own `FlagValues`, parsed from its argv.

`python -m benchmarks SUITE --flags` hands the words after SUITE to the
suite. Every suite defines its flags at module level on a `FlagValues` of its
own (not absl's global `FLAGS`), so suites that define the same flag name
(`--depth`, `--batch`, `--json`) import side by side, and a module that runs
another suite passes it plain values (`options`) instead of an argv.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence

from absl import flags

_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def parse(flag_values: flags.FlagValues, argv: Sequence[str], suite: str, doc: str):
    """The suite's options from its argv; `--help` prints the flags and exits 0.

    A bad flag, or a word that is not a flag, prints one error line and exits 2.
    The values are returned as a namespace (attribute per flag), as `options` makes.
    """
    prog = f"python -m benchmarks {suite}"
    argv = list(argv)
    if any(a in _HELP for a in argv):
        help_text = flag_values.get_help(prefix="  ", include_special_flags=False)
        print(f"usage: {prog} [--flag=value ...]\n\n{doc.strip()}\n\nflags:\n{help_text}")
        raise SystemExit(0)
    flag_values.unparse_flags()
    try:
        rest = flag_values([prog, *argv])
    except flags.Error as e:
        usage_error(prog, str(e))
    if len(rest) > 1:
        usage_error(prog, f"unexpected arguments: {' '.join(rest[1:])}")
    return types.SimpleNamespace(**{name: flag_values[name].value for name in flag_values})


def options(flag_values: flags.FlagValues, **values):
    """The suite's options at their defaults, with `values` set (by flag name).

    Examples:
      >>> fv = flags.FlagValues()
      >>> _ = flags.DEFINE_integer("depth", 16, "depth", flag_values=fv)
      >>> options(fv, depth=10).depth, options(fv).depth
      (10, 16)
      >>> options(fv, detph=10)
      Traceback (most recent call last):
      TypeError: no flag --detph; the flags are ['depth'].
    """
    names = sorted(flag_values)
    unknown = [name for name in values if name not in names]
    if unknown:
        raise TypeError(f"no flag --{unknown[0]}; the flags are {names}.")
    return types.SimpleNamespace(**{name: flag_values[name].default for name in names} | values)


def usage_error(prog: str, message: str):
    """Prints one error line (and where to get help) on stderr; exits 2."""
    print(f"{prog}: error: {message}\nTry --help.", file=sys.stderr, flush=True)
    raise SystemExit(2)
