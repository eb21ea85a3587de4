#!/usr/bin/env bash
# Lint and format check (ruff, configured in pyproject.toml). Pass --fix to apply fixes.
set -euo pipefail
cd "$(dirname "$0")/.."
RUFF="${RUFF:-$( [ -x .venv/bin/ruff ] && echo .venv/bin/ruff || echo ruff )}"
if [ "${1:-}" = "--fix" ]; then
  "$RUFF" check --fix . && "$RUFF" format .
else
  "$RUFF" check . && "$RUFF" format --check .
fi
