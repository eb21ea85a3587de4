"""Benchmarks that report ratios measured in one run: `python -m dirac_jax.bench {fold,train}`."""
