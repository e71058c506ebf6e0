# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo lint clean

setup:
	bash tools/setup/setup_env.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/spark-det demo --output outputs/demo

lint: setup
	$(PY) -m ruff check spark_det tools tests benchmarks

clean:
	rm -rf outputs .pytest_cache
