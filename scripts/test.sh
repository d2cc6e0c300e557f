#!/usr/bin/env bash
# Set everything up, lint, and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
# the documentation site, warnings as errors: a broken link or docstring reference fails here
.venv/bin/mkdocs build --strict --quiet --site-dir build/site
.venv/bin/python -m pytest -q -m "not slow" "$@"
# the GPU machine's check, every part end to end on this CPU (gloo, tiny runs; about 110 s)
bash scripts/gpu_check.sh --smoke
