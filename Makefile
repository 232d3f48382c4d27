# LLMasOS: `make quickstart` and `make test` work from a fresh clone with nothing before them.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint bench quickstart clean

install: $(STAMP)

# torch is pinned to 2.13.0, which resolves to the local CPU wheel on the project machines;
# installing it first keeps pip from pulling a CUDA build for any dependency.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[all,test,bench]'
	touch $(STAMP)

# The habits that keep the code as it is: ruff (lint and format) and mypy on the typed public API, then every test.
test: $(STAMP) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# The inner loop: everything but the slow end-to-end tests.
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

quickstart: $(STAMP)
	$(BIN)/llmasos quickstart

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
