# Shared set-up, sourced by the launch scripts: Debian data package, venv, the project.
# Usage: source launch/_setup.sh [pip extras, e.g. "[test]"] [pip constraints file]
# Environment: VENV (default .venv), PYTHON (the interpreter that creates a new venv; default
# python3), UPGRADE=1 (upgrade every dependency to its newest release, for the newest stack).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
EXTRAS="${1:-}"
# CI pins every dependency to the versions the suite last passed with (launch/constraints.txt);
# users get pyproject.toml's ranges.
INSTALL_OPTIONS=()
if [ -n "${2:-}" ]; then INSTALL_OPTIONS=(--constraint "$2"); fi
if [ "${UPGRADE:-0}" = 1 ]; then INSTALL_OPTIONS+=(--upgrade --upgrade-strategy eager); fi

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Real Fashion-MNIST for the quickstart and the real-data tests (Debian package, no download).
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "[setup] installing Debian package dataset-fashion-mnist"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check --upgrade pip
echo "[setup] installing dirac_jax$EXTRAS"
"$PY" -m pip install -q --disable-pip-version-check ${INSTALL_OPTIONS[@]+"${INSTALL_OPTIONS[@]}"} -e "$ROOT$EXTRAS"
