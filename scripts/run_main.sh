#!/usr/bin/env bash
# The main job: install into .venv (CPU torch 2.13.0), train the tiny LaVin-DiT on the built-in in-context tasks,
# then serve the Gradio demo from that run on http://127.0.0.1:7860.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
$PY -m venv .venv
.venv/bin/pip install -q torch==2.13.0 -e ".[dev]"
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
.venv/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no train/lavin_dit.py
exec .venv/bin/python serve/app.py --checkpoint runs/lavin_dit
