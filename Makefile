# The set-up contract: `make demo` and `make test` work on a fresh machine with
# Python 3.11+ and make; each creates .venv when missing and installs what it needs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python

.PHONY: demo test lint typecheck pytest postgres-server docs wheel-smoke bench soak fuzz clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "parall_bridge needs Python 3.11+ (set PYTHON=python3.X)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-docs: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[docs]'
	@touch $@ $(VENV)/.installed

# The dev extra includes the docs extra.
$(VENV)/.installed-dev: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.installed $(VENV)/.installed-docs

demo: $(VENV)/.installed
	$(PY) -m parall_bridge demo

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy --strict parall_bridge tests benchmarks examples tools

# The suite runs on every core (pytest-xdist): each worker has its own emulators and, when
# a test asks for one, its own throwaway PostgreSQL server.
pytest: $(VENV)/.installed-dev postgres-server
	$(BIN)/pytest -n auto

# The PostgreSQL store's tests start a throwaway server (initdb and pg_ctl into a temporary
# folder): Debian's postgresql package provides them. A no-op when they are there.
postgres-server:
	@command -v pg_ctl >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
		echo "installing Debian's postgresql package (the PostgreSQL store's tests run a server)"; \
		if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
		$$sudo apt-get update -qq && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql; \
	}

# What CI runs: lint, types, the suite, the docs (strict), and the package as a user gets it,
# two at a time (the suite waits on sockets and timers as much as it computes: on 2 cores
# this takes about 2.5 minutes instead of 3.5), each one's output kept together.
# The installs come first, one at a time (two pip runs in one venv would race).
test:
	@$(MAKE) --no-print-directory $(VENV)/.installed-dev postgres-server
	@$(MAKE) --no-print-directory -j2 --output-sync=target lint typecheck pytest docs wheel-smoke

# The sdist and a wheel built from it, the wheel installed alone in a fresh venv, and its
# command line run from outside the checkout (tools/wheel_smoke.py).
wheel-smoke: $(VENV)/.installed-dev
	$(PY) tools/wheel_smoke.py

bench: $(VENV)/.installed-dev
	$(PY) -m benchmarks
	$(PY) -m benchmarks.perf
	$(PY) -m benchmarks.fleet
	$(PY) -m benchmarks.import_time

# The fleet soak runs its fleet processes on a throwaway PostgreSQL server.
soak: $(VENV)/.installed-dev postgres-server
	$(PY) -m benchmarks.soak
	$(PY) -m benchmarks.crash
	$(PY) -m benchmarks.fleet_soak

fuzz: $(VENV)/.installed-dev
	$(PY) -m benchmarks.fuzz

docs: $(VENV)/.installed-docs
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
