# Loomwatch: the targets README names.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: setup demo test test-fast lint typecheck pytest format bench clean container-test reliability

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## Fresh machine: synthetic fabric -> PatchCore tracked in MLflow, registered as
## fabric-demo@champion -> evaluate (HTML report) -> predict -> serve (Ctrl-C stops it).
demo: $(STAMP)
	$(BIN)/loomwatch demo

## Lint, format check, type check and the test suite (what CI runs).
test: lint typecheck pytest

## The inner loop: the tests not marked slow (no servers, real trainings or fuzzing).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## Latency and memory of a bundle: make bench BUNDLE=runs/demo/bundle
bench: $(STAMP)
	$(BIN)/python -m bench.latency --bundle $(BUNDLE) $(BENCH_ARGS)

## Build the Docker image for real (podman, no Docker engine needed; root) and start it:
## lint, build, /health, /ready, /predict from inside the image. Not in CI (README "Deployment").
container-test: $(STAMP)
	$(BIN)/python deploy/container_test.py

## Reliability: load (1, 4 and 4 x workers clients; a 2,000-request leak check), fuzzing
## (500+ schemathesis cases), hostile uploads and faults, then one summary table
## (README "Reliability"). Long: about 17 minutes on 2 shared cores. Not in CI.
reliability: $(STAMP)
	$(BIN)/python -m bench.reliability $(RELIABILITY_ARGS)

clean:
	rm -rf runs predictions .mypy_cache .ruff_cache .pytest_cache
