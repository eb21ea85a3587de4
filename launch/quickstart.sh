#!/usr/bin/env bash
# The offline quickstart: installs what it needs (the Debian package dataset-fashion-mnist
# included) and trains a small DiracNet on real Fashion-MNIST for 300 steps on the CPU.
# Extra arguments are passed to dirac_jax.main, e.g. --config.num_train_steps=1000.
set -euo pipefail
source "$(dirname "$0")/_setup.sh" ""
cd "$ROOT"
exec "$PY" -m dirac_jax.main \
  --config=configs/fashion_mnist_dirac.py \
  --config.num_train_steps=300 \
  --workdir="${WORKDIR:-runs/fashion_mnist_quickstart}" \
  "$@"
