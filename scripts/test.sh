#!/usr/bin/env bash
# Install into .venv (CPU torch 2.13.0; naming it keeps pip from pulling a multi-GB CUDA build), lint, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
$PY -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e ".[dev]"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_PROGRESS_BARS=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -m "not gpu" "$@"
