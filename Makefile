# wasmhost: every target sets up .venv on first use; nothing needs installing by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FIXTURES := tests/fixtures/build

.PHONY: run test lint bench fuzz fixtures examples check clean lattice

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

fixtures: $(STAMP)
	$(BIN)/python tests/fixtures/build.py --out $(FIXTURES)

examples: $(STAMP)
	$(BIN)/python config/build_examples.py

lint: $(STAMP)
	$(BIN)/ruff check wasmhost tests bench
	$(BIN)/mypy

# One pytest worker per core (pytest-xdist): most tests wait on daemons, timeouts and NATS servers, so two
# workers on two cores take 4 to 5 minutes where one took 7 and a half. A test file runs on one worker: some
# files' last test reads what the earlier ones counted (tests/test_fuzz.py).
test: fixtures examples lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile

fuzz: fixtures
	HYPOTHESIS_PROFILE=fuzz FUZZ_CONTROL_EXAMPLES=300 $(BIN)/python -m pytest -q -s tests/test_fuzz.py \
		tests/test_lifecycle_chaos.py tests/test_reload_chaos.py tests/test_lattice_chaos.py

bench: fixtures examples  # startup runs the example greeter from config/build
	$(BIN)/python -m bench

run: examples
	$(BIN)/wasmhost run

lattice: examples  # nats-server and two daemons (config/lattice/); Ctrl-C stops all three
	$(BIN)/python config/lattice/demo.py

check: examples
	$(BIN)/wasmhost check

clean:
	rm -rf $(VENV) $(FIXTURES) config/build config/state .pytest_cache .mypy_cache .ruff_cache
