"""Benchmarks and device tooling, run from a checkout: `python -m benchmarks SUITE`.

The suites are the modules of this package without a leading underscore (`train`,
`fold_latency`, `deploy`, `int8`, ..., and `device_check`, which
`launch/device_check.sh` runs on an accelerator host); `python -m benchmarks`
lists them. Run them from the repository's root (or with it on `PYTHONPATH`):
this folder sits beside `dirac_jax/`, not in it, so the wheel holds the library
only, as flax keeps its benchmarks beside its examples. The suites import
`dirac_jax` like any user does, and PyTorch, onnxruntime and pytest where they
compare against them or run the tests.
"""

# Run, not imported: python -m benchmarks SUITE [--flag=value ...].
__all__: list[str] = []
