# make verify: set up .venv if needed, install, run the spec against the oracle on every backend.
# make test:   the same set-up, then lint, type checks and the whole test suite.

PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch used for development and CI; elsewhere `make TORCH=torch ...`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: verify test lint typecheck install clean

verify: $(STAMP)
	$(BIN)/refattn verify

test: lint typecheck
	$(BIN)/pytest -n auto

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy refattn backends tests benchmarks examples

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test,dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
