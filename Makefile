# The set-up contract: `make demo` and `make test` work on a fresh machine with
# Python 3.11+ and make; each creates .venv when missing and installs what it needs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python

.PHONY: demo test lint typecheck pytest bench soak fuzz docs clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "parall_bridge needs Python 3.11+ (set PYTHON=python3.X)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m parall_bridge demo

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy --strict parall_bridge tests benchmarks examples

pytest: $(VENV)/.installed-dev
	$(BIN)/pytest

test: lint typecheck pytest

bench: $(VENV)/.installed-dev
	$(PY) -m benchmarks
	$(PY) -m benchmarks.perf

soak: $(VENV)/.installed-dev
	$(PY) -m benchmarks.soak
	$(PY) -m benchmarks.crash

fuzz: $(VENV)/.installed-dev
	$(PY) -m benchmarks.fuzz

docs: $(PY)
	$(PY) -m pip install --quiet -e '.[docs]'
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
