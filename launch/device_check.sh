#!/usr/bin/env bash
# Measures and checks everything on a fresh accelerator host, in under 8 minutes on one H100:
# environment, the accelerator tests, training throughput against PyTorch, an ImageNet-shaped
# step, folded inference, a profile. Writes DIR/report.md and DIR/report.json after each section.
#
# Usage: bash launch/device_check.sh [--out DIR] [--wheels DIR] [--smoke] [--budget SECONDS]
#   --out DIR     the report folder (default ./device_check)
#   --wheels DIR  a folder of wheels for what the host's Python lacks (default ./.whl if present);
#                 fill it on a machine with network, see README "On a GPU host"
#   --smoke       every section at tiny sizes on the CPU (a few minutes)
#   python -m benchmarks device_check --help lists the rest (--sections, --box, --allow_untested).
#
# No network is needed. The host's Python is used as it is (the first of $PYTHON, the checkout's
# .venv, python3 that imports jax); only what it lacks is installed, from --wheels, with
# --no-index --no-deps into a folder put first on PYTHONPATH, never into the host's Python. The
# project runs from this checkout (PYTHONPATH: benchmarks/ and dirac_jax/), so none of it is
# installed either. A JAX, Flax or Orbax outside the range the tests have passed on stops the run
# before its first section, with one line and exit status 2 (benchmarks/_host_deps.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

WHEELS=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
    --wheels=*) WHEELS="${1#--wheels=}"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if [ -z "$WHEELS" ] && [ -d "$ROOT/.whl" ]; then WHEELS="$ROOT/.whl"; fi
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { echo "error: --wheels $WHEELS is not a folder" >&2; exit 2; }
  WHEELS="$(cd "$WHEELS" && pwd)"
fi

PY=""
for candidate in "${PYTHON:-}" "$ROOT/.venv/bin/python" python3 python; do
  if [ -n "$candidate" ] && command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c "import jax" >/dev/null 2>&1; then
    PY="$(command -v "$candidate")"
    break
  fi
done
if [ -z "$PY" ]; then
  echo "error: no Python with JAX found (tried \$PYTHON, $ROOT/.venv/bin/python, python3," \
    "python); install jax for the accelerator (e.g. jax[cuda12]) or set PYTHON" >&2
  exit 2
fi
echo "[device_check] Python: $PY ($("$PY" -c 'import sys, jax; print(sys.version.split()[0], "jax", jax.__version__)'))"

SITE="${DEVICE_CHECK_SITE:-${TMPDIR:-/tmp}/dirac_jax_device_site}"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
# The wheels the host lacks: stdlib and pip's packaging only, nothing of the project's deps.
PLAN="$("$PY" -m benchmarks._host_deps ${WHEELS:+--wheels "$WHEELS"})" || exit 2
if [ -n "$PLAN" ]; then
  mapfile -t MISSING <<<"$PLAN"  # one wheel path per line
  echo "[device_check] installing into $SITE: $(basename -a "${MISSING[@]}" | tr '\n' ' ')"
  mkdir -p "$SITE"
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --upgrade --target "$SITE" "${MISSING[@]}"
fi
exec "$PY" -m benchmarks device_check ${ARGS[@]+"${ARGS[@]}"}
