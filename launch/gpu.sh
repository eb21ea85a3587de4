#!/usr/bin/env bash
# Trains on every GPU of one host: jax.jit over a mesh of all local devices.
# Usage: launch/gpu.sh CONFIG WORKDIR [--config.field=value ...]
#   e.g. launch/gpu.sh configs/cifar_dirac.py runs/cifar_dirac_28_10
set -euo pipefail
CONFIG="${1:?usage: launch/gpu.sh CONFIG WORKDIR [overrides...]}"
WORKDIR="${2:?usage: launch/gpu.sh CONFIG WORKDIR [overrides...]}"
shift 2
source "$(dirname "$0")/_setup.sh" "[tf]"
# The CUDA build of jaxlib; "jax[cuda12]" pulls matching CUDA libraries from PyPI.
"$PY" -m pip install -q --disable-pip-version-check -U "jax[cuda12]"
cd "$ROOT"
# Let XLA take most of the GPU memory up front; tf.data stays on the CPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export TF_CPP_MIN_LOG_LEVEL=2
exec "$PY" -m dirac_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
