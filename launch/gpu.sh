#!/usr/bin/env bash
# Trains on every GPU of one host (jax.jit over a mesh of all devices), or of several hosts.
# Usage: launch/gpu.sh CONFIG WORKDIR [--config.field=value ...]
#   e.g. launch/gpu.sh configs/cifar_dirac.py runs/cifar_dirac_28_10
#   ImageNet: launch/gpu.sh configs/imagenet_dirac.py runs/diracnet18 \
#     --config.dataset.data_dir=TFDS_DIR --config.dataset.num_workers=16
#   Several hosts: COORDINATOR=10.0.0.1:1234 NUM_PROCESSES=2 PROCESS_ID=0 launch/gpu.sh ...
set -euo pipefail
CONFIG="${1:?usage: launch/gpu.sh CONFIG WORKDIR [overrides...]}"
WORKDIR="${2:?usage: launch/gpu.sh CONFIG WORKDIR [overrides...]}"
shift 2
source "$(dirname "$0")/_setup.sh"
# The CUDA build of jaxlib; "jax[cuda12]" pulls matching CUDA libraries from PyPI.
"$PY" -m pip install -q --disable-pip-version-check -U "jax[cuda12]"
cd "$ROOT"
# Let XLA take most of the GPU memory up front; the Grain input pipeline runs on the CPUs.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
# Several GPU hosts: run this script on each with the same COORDINATOR (host:port of
# process 0), NUM_PROCESSES, and its own PROCESS_ID.
MULTI=()
if [ -n "${COORDINATOR:-}" ]; then
  MULTI=(--coordinator_address="$COORDINATOR" --num_processes="${NUM_PROCESSES:?set NUM_PROCESSES}"
         --process_id="${PROCESS_ID:?set PROCESS_ID}")
fi
exec "$PY" -m dirac_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${MULTI[@]}" "$@"
