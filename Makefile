# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# `make test` also runs the framework-free part of the suite (sparse, model, data, train, transfer) in
# .venv-min, on the lowest torch / torchvision / timm that setup.cfg allows (tools/setup/setup_min_env.sh);
# the slow tests there (timm families, multi-process runs) only by hand: make test-min MIN_MARKERS="not detectron2 and not mmdet"
VENV_MIN ?= .venv-min
MIN_TESTS ?= tests/sparse tests/model tests/data tests/train tests/transfer
MIN_MARKERS ?= not slow and not detectron2 and not mmdet
RUN_MIN := $(VENV_MIN)/bin/python -m pytest $(MIN_TESTS) -m "$(MIN_MARKERS)"

.PHONY: setup setup-min test test-min test-fast demo lint docs clean

setup:
	bash tools/setup/setup_env.sh

setup-min:
	SPARK_DET_MIN_VENV=$(VENV_MIN) bash tools/setup/setup_min_env.sh

test: setup setup-min
	$(PY) -m pytest $(PYTEST_ARGS)
	$(RUN_MIN)

test-min: setup-min
	$(RUN_MIN)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/spark-det demo --output outputs/demo

lint: setup
	$(PY) -m ruff check spark_det tools tests benchmarks

# The documentation site (mkdocs.yml, docs/), built offline into site/; strict: a broken link or anchor fails.
# tests/test_docs.py builds it the same way in the test suite.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf outputs site .pytest_cache
