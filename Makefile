# One entry point for people and for CI: the workflows call these same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup run test test-fast lint format repro clean

$(BIN)/tuneloop: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

## setup: create .venv and install tuneloop with its pinned dependencies
setup: $(BIN)/tuneloop

## run: the main job on the embedded defaults: init data + DVC remote, then the whole pipeline
run: setup
	$(BIN)/tuneloop run

## repro: re-run only what changed (`dvc repro`)
repro: setup
	$(BIN)/dvc repro

## test: every test, slow ones included (what CI runs)
test: setup
	$(BIN)/pytest -q

## test-fast: unit, data and model tests only
test-fast: setup
	$(BIN)/pytest -q -m "not slow"

## lint: ruff on the code
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf .tuneloop data/prepared models reports metrics plots .pytest_cache
