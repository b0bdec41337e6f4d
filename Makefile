# The two commands of the README's quick start, on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint format bench clean

# The server and, beside it, the client package (clients/python), whose `runyard` command runs
# the client commands and the server's admin commands. The client goes second: a venv made
# before it had the server's own `runyard` script, which upgrading the server deletes.
$(STAMP): setup.cfg pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev]'
	$(BIN)/python -m pip install --quiet -e './clients/python[cli]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/runyard up

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .runyard *.egg-info .pytest_cache .ruff_cache .import_linter_cache
