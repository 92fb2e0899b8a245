# Every target creates the virtual environment on first use, so a fresh clone needs only `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install test test-full demo clean bench stress

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable '.[test]'
	touch $@

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-full: install
	$(BIN)/python -m pytest tests/full -o addopts="" $(PYTEST_ARGS)

demo: install
	$(BIN)/python -m airflow_audit_export.testing.demo

# Benchmarks (not part of `make test`): make bench BENCH_ARGS="--sizes 20000 --steady-sizes 20000,100000"
BENCH_ARGS ?=

bench: install
	$(BIN)/pip install --quiet --editable '.[test,bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# 1000 seeded random interleavings of writers and export runs (not part of `make test`): make stress
stress: install
	$(BIN)/python -m airflow_audit_export.testing.interleavings --count 1000 --seed-start 1000

clean:
	rm -rf $(VENV) .demo .pytest_cache *.egg-info
