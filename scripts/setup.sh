#!/usr/bin/env bash
# Create .venv and install droppos with its dependencies (idempotent; re-running is cheap).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned to a matching torchvision: a mismatched pair fails at import time.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# dev: tests and benchmarks; mmseg: MMSegmentation, for the round trip of its export (~10 s);
# docs: MkDocs, which builds the documentation site (scripts/test.sh builds it, warnings as errors)
.venv/bin/python -m pip install -q -e ".[dev,mmseg,docs]"
