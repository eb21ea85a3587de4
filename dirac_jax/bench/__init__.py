"""Benchmarks that report ratios measured in one run: `python -m dirac_jax.bench SUITE`.

The suites are the modules of this package without a leading underscore (`train`,
`fold_latency`, `deploy`, `int8`, ...); `python -m dirac_jax.bench` lists them.
"""

# Run, not imported: python -m dirac_jax.bench SUITE [--flag=value ...].
__all__: list[str] = []
