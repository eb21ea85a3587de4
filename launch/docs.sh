#!/usr/bin/env bash
# Builds the documentation site into docs/_build/html and runs the guides' code.
# Warnings are errors (-W, nitpicky in docs/conf.py): a broken reference or bad reST fails the
# build; --keep-going reports all of them first. The doctest builder then runs every code block
# of the guides (they train on the real Fashion-MNIST at tiny sizes); the docstrings' own
# examples run under pytest (--doctest-modules).
# Set-up as launch/test.sh's floor stack: the docs and onnx extras, pinned by constraints.txt.
set -euo pipefail
source "$(dirname "$0")/_setup.sh" "[docs,onnx]" "$(cd "$(dirname "$0")" && pwd)/constraints.txt"
cd "$ROOT"
rm -rf docs/_build
"$PY" -m sphinx -b html -W --keep-going -q docs docs/_build/html
"$PY" -m sphinx -b doctest -W --keep-going -q docs docs/_build/doctest
echo "[docs] docs/_build/html/index.html; the guides' code ran (docs/_build/doctest/output.txt)"
