# One entry point for people and for CI: the workflows call these same targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: help setup run demo down test test-fast lint typecheck format repro pull dvc-remote model-gate dist clean

$(BIN)/tuneloop: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

## help: list these targets with what each does (from their `## target: text` comments)
help:
	@awk '/^## [A-Za-z0-9_.-]+:/ { name = $$2; sub(/:$$/, "", name); text = $$0; \
			sub(/^## [^:]+: */, "", text); printf "  %-12s %s\n", name, text; next } \
		/^##   / && name != "" { text = $$0; sub(/^## +/, "", text); printf "  %-12s %s\n", "", text; next } \
		{ name = "" }' $(firstword $(MAKEFILE_LIST))

## setup: create .venv and install tuneloop with its pinned dependencies
setup: $(BIN)/tuneloop

## run: the main job on the embedded defaults: init data + DVC remote, then the whole pipeline
run: setup
	$(BIN)/tuneloop run

## demo: the whole loop once on the embedded defaults, as a story with each step's numbers and time:
##   train, approve, promote, serve, drift, retrain, hot swap, rollback; leaves the UIs running
demo: setup
	$(BIN)/tuneloop demo

## down: stop what `make demo` or `tuneloop up --background` left running
down: setup
	$(BIN)/tuneloop down

## repro: re-run only what changed (`dvc repro`)
repro: setup
	$(BIN)/dvc repro

## test: every test, slow ones included (what CI runs)
test: setup
	$(BIN)/pytest -q --durations=25

## test-fast: unit, data and model tests only
test-fast: setup
	$(BIN)/pytest -q -m "not slow"

## lint: ruff on the code; GitHub's schema on the workflows; pre-commit's on its config
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml
	$(BIN)/pre-commit validate-config .pre-commit-config.yaml

## typecheck: mypy on every package, as [tool.mypy] in pyproject.toml configures it
typecheck: setup
	$(BIN)/mypy

## pull: fetch the DVC-tracked data (and stage outputs already pushed) from the default remote
pull: setup
	$(BIN)/dvc pull --allow-missing

# The DVC plugin each remote URL scheme needs (a folder needs none), installed by `make dvc-remote`.
DVC_PLUGIN_s3 := dvc-s3
DVC_PLUGIN_gs := dvc-gs
DVC_PLUGIN_azure := dvc-azure
DVC_PLUGIN_gdrive := dvc-gdrive
DVC_PLUGIN_ssh := dvc-ssh
DVC_REMOTE_PLUGIN = $(DVC_PLUGIN_$(firstword $(subst ://, ,$(DVC_REMOTE_URL))))

## dvc-remote: make DVC_REMOTE_URL (s3://, gs://, azure://, gdrive://, ssh:// or a folder) the default remote
##             in .dvc/config.local; credentials come from the environment (see docs/merge-gate.md)
dvc-remote: setup
	@test -n "$(DVC_REMOTE_URL)" || { echo "set DVC_REMOTE_URL, e.g. s3://my-bucket/dvc" >&2; exit 2; }
	$(if $(DVC_REMOTE_PLUGIN),$(BIN)/pip install --quiet -c constraints.txt $(DVC_REMOTE_PLUGIN))
	test -d .dvc || $(BIN)/dvc init --quiet
	$(BIN)/dvc remote add --local --default --force storage "$(DVC_REMOTE_URL)"
	$(if $(DVC_REMOTE_ENDPOINT_URL),$(BIN)/dvc remote modify --local storage endpointurl "$(DVC_REMOTE_ENDPOINT_URL)")

BASE_REF ?= origin/main
GATE_DIR ?= .tuneloop/model-gate

## model-gate: judge metrics/ against BASE_REF's committed ones (allowed drops: params.yaml model_gate)
##             and the promotion gates; report in $(GATE_DIR)/report.md. E.g. make model-gate BASE_REF=main
model-gate: setup
	@git rev-parse --verify --quiet "$(BASE_REF)^{commit}" >/dev/null || \
		{ echo "BASE_REF=$(BASE_REF) is not a commit here: git fetch it first" >&2; exit 2; }
	rm -rf $(GATE_DIR) && mkdir -p $(GATE_DIR)/base
	for name in evaluate.json gates.json; do \
		git show "$(BASE_REF):metrics/$$name" > $(GATE_DIR)/base/$$name 2>/dev/null || rm -f $(GATE_DIR)/base/$$name; \
	done
	$(BIN)/dvc metrics diff --md "$(BASE_REF)" > $(GATE_DIR)/metrics-diff.md || \
		echo "_dvc metrics diff failed: see the job log._" > $(GATE_DIR)/metrics-diff.md
	$(BIN)/dvc params diff --md "$(BASE_REF)" > $(GATE_DIR)/params-diff.md || \
		echo "_dvc params diff failed: see the job log._" > $(GATE_DIR)/params-diff.md
	$(BIN)/tuneloop model-gate --base-metrics-dir $(GATE_DIR)/base --head-metrics-dir metrics \
		--base-label "$(BASE_REF)" \
		--metrics-diff $(GATE_DIR)/metrics-diff.md --params-diff $(GATE_DIR)/params-diff.md \
		--markdown-out $(GATE_DIR)/report.md $(if $(GITHUB_STEP_SUMMARY),--step-summary "$(GITHUB_STEP_SUMMARY)")

## dist: build the sdist and the wheel into dist/
dist: setup
	rm -rf dist
	$(BIN)/python -m build --outdir dist .

## format: rewrite the code into ruff's format and apply ruff's safe fixes
format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Git-ignored files only (-X): metrics/ and plots/ hold committed results next to ignored outputs.
CLEAN_PATHS := .tuneloop data/prepared models reports metrics plots .pytest_cache .mypy_cache .ruff_cache

## clean: delete pipeline outputs, runtime state and caches that git ignores; tracked files stay
clean:
	git clean -fdX -- $(CLEAN_PATHS)
