"""Benchmarks that report ratios measured in one run: `python -m dirac_jax.bench {fold,train}`."""

# Run, not imported: python -m dirac_jax.bench {bf16,fold,train}.
__all__: list[str] = []
