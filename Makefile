# Targets named in README.md. `make test` is exactly the README's test command (and .ci/run).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
INSTALL := $(PY) -m venv $(VENV) && $(BIN)/pip install -q torch==2.13.0 -e ".[dev]"

.PHONY: install run test test-fast quality style bench

install:
	$(INSTALL)

run:  ## install, train the tiny LaVin-DiT on the built-in tasks, then serve the demo on 127.0.0.1:7860
	./scripts/run_main.sh

test:  ## install, lint, run the whole CPU suite
	./.ci/run

test-fast:
	$(BIN)/python -m pytest -m "not slow and not e2e and not gpu"

quality:
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/python -m pytest -q tests/test_layering.py

style:
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

bench:
	for f in benchmarks/*.py; do $(BIN)/python $$f || exit 1; done
