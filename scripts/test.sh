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
# --- serve/ browser test (tests/serve/test_e2e_browser.py): Debian's Chromium, driven by Playwright's Python API.
# Installed only when missing; never `playwright install` (it downloads a browser build, which cannot be fetched here).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
# --- end serve/ block
# --- data/ torchcodec block (tests/data/test_decoders.py): the data extra's torchcodec (x86_64 Linux) loads FFmpeg's
# shared libraries from the system; Debian bookworm's FFmpeg 5.1 packages, installed only when one is missing.
if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
  FFMPEG_LIBS="libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59 libavfilter8"
  MISSING=""
  for lib in $FFMPEG_LIBS; do
    dpkg-query -W -f='${Status}' "$lib" 2>/dev/null | grep -q "install ok installed" || MISSING="$MISSING $lib"
  done
  if [ -n "$MISSING" ]; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    # shellcheck disable=SC2086 # one word per package
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $MISSING >/dev/null
  fi
fi
# --- end data/ block
.venv/bin/python -m pytest -m "not gpu" "$@"
