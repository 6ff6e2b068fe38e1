# make verify: set up .venv if needed, install, run the spec against the oracle on every backend.
# make test:   the same set-up, then lint, type checks and the whole test suite.
# make docs:   the same set-up plus the docs extra, then the HTML site in docs/_build/html,
#              warnings as errors, checked for any script, stylesheet or font fetched remotely.
# make conformance: the same set-up, then `refattn conformance` over every installed library,
#              written to docs/conformance.json and rebuilt into docs/conformance.md.
# make docs-check: make docs, then render the main pages in headless Chromium (screenshots in
#              docs/_build/screenshots) and check that formulas and plots appear.

PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch used for development and CI; elsewhere `make TORCH=torch ...`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DOCS_STAMP := $(VENV)/.installed-docs
HTML := docs/_build/html

.PHONY: verify test lint typecheck install docs docs-check conformance clean

verify: $(STAMP)
	$(BIN)/refattn verify

# The process-group tests spawn 2 and 4 ranks each, with time limits: a run of their own,
# so the other suite's workers do not starve them of the cores.
# JAX compiles a program for every new shape, so it joins the matrix in a pass of its own
# with fewer examples, over the spec, the blockwise forms and merges, decoding, every cache
# kind (the decoding property, failed updates, cross-attention) and the models.
JAX_TESTS := tests/test_attention_matches_oracle.py tests/test_blockwise.py \
	tests/test_decode_equals_full.py tests/test_caches.py tests/test_models.py tests/test_backends.py
JAX_SKIPS := extra_right_padding or which_physical or rope_applied or alibi_through or static_dynamic

test: lint typecheck
	$(BIN)/pytest -n auto --ignore=tests/test_distributed.py
	$(BIN)/pytest -n 2 tests/test_distributed.py
	REFATTN_BACKENDS=jax REFATTN_EXAMPLES=4 $(BIN)/pytest -n auto -k "jax and not ($(JAX_SKIPS))" \
		$(JAX_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy refattn backends tests benchmarks examples docs

install: $(STAMP)

conformance: $(STAMP)
	$(BIN)/refattn conformance --json docs/conformance.json
	$(BIN)/python -m refattn.testing.conformance.page docs/conformance.json docs/conformance.md

docs: $(DOCS_STAMP)
	rm -rf $(HTML)
	$(BIN)/sphinx-build -W --keep-going -b html docs $(HTML)
	$(BIN)/python docs/check_offline.py $(HTML)

docs-check: docs
	$(BIN)/python docs/check_render.py $(HTML) docs/_build/screenshots

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[test,dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis docs/_build \
		docs/figures/caches
