#!/usr/bin/env bash
# The offline quickstart: installs what it needs (the Debian package dataset-fashion-mnist, and
# dirac_jax with its `onnx` extra, so the ONNX and INT8 exports that follow work) and trains a
# small DiracNet on real Fashion-MNIST for 300 steps on the CPU.
#
#   bash launch/quickstart.sh                      # trains into runs/fashion_mnist_quickstart
#   bash launch/quickstart.sh --config.num_train_steps=1000 --config.augment=True
#
# Extra arguments go to `python -m dirac_jax.main`. A run's config is fixed once it has
# started (rerunning the same command resumes it), so changed settings train in a folder of
# their own, named after them: the second line above trains into
# runs/fashion_mnist_quickstart-num_train_steps=1000-augment=True.
#
# Environment:
#   WORKDIR   the run's folder, instead of the name above (an existing run of another
#             config is refused, with one line that says so).
#   VENV      the virtual environment (default .venv), as for the other launch scripts.
#
# At the end the script prints the commands that evaluate, export and load the run.
set -euo pipefail
source "$(dirname "$0")/_setup.sh" "[onnx]"
cd "$ROOT"

suffix=""
for arg in "$@"; do
  case "$arg" in
    --config.*) suffix+="-${arg#--config.}" ;;
    --workdir=*) WORKDIR="${arg#--workdir=}" ;;  # the last --workdir wins, as in absl
  esac
done
WORKDIR="${WORKDIR:-runs/fashion_mnist_quickstart${suffix//\//_}}"

"$PY" -m dirac_jax.main \
  --config=configs/fashion_mnist_dirac.py \
  --config.num_train_steps=300 \
  "$@" \
  --workdir="$WORKDIR"

cat <<EOF

Next, with this run (see README.md):
  $PY -m dirac_jax.evaluate --workdir=$WORKDIR
  $PY -m dirac_jax.export --workdir=$WORKDIR --format=onnx --out=$WORKDIR/model.onnx
  $PY -m dirac_jax.export --workdir=$WORKDIR --format=onnx --quantize=int8 --out=$WORKDIR/model.int8.onnx
  $PY -m dirac_jax.evaluate --workdir=$WORKDIR --onnx=$WORKDIR/model.int8.onnx
  $PY -c "import dirac_jax; model, variables, config = dirac_jax.load('$WORKDIR'); print(config.model)"
EOF
