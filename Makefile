# wasmhost: every target sets up .venv on first use; nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FIXTURES := tests/fixtures/build

.PHONY: run test lint bench fixtures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

fixtures: $(STAMP)
	$(BIN)/python tests/fixtures/build.py --out $(FIXTURES)

lint: $(STAMP)
	$(BIN)/ruff check wasmhost tests bench
	$(BIN)/mypy

test: fixtures lint
	$(BIN)/python -m pytest -q

bench: fixtures
	$(BIN)/python -m bench

run: fixtures
	$(BIN)/wasmhost run

clean:
	rm -rf $(VENV) $(FIXTURES) .pytest_cache .mypy_cache .ruff_cache
