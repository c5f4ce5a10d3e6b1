# Two commands for a fresh machine: `make run` and `make test`. Everything installs into .venv, idempotently.
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export SAGEMAKER_BIND_TO_PORT ?= 8080

.PHONY: help install install-test run test lint test-slow bench clean docker-build docker-run docker-test image-test \
	install-deploy local-sagemaker gpu-check gpu-wheels

help:
	@echo "make run        install and serve the embedded SmolLM2 model on :$(SAGEMAKER_BIND_TO_PORT)"
	@echo "make test       install test needs and run the suite (fast + end-to-end)"
	@echo "make lint       ruff check and ruff format --check (line length 120) over the Python sources"
	@echo "make test-slow  the slow tests only"
	@echo "make bench      load benchmark vs vLLM-CPU and transformers serve (BENCH_WORKLOADS=standard,capacity,prefix) -> docs/benchmarks.md"
	@echo "make gpu-check  GPU figures (bandwidth floor, tests/gpu, engine step, server, HF generate) -> OUT_DIR; CPU: dry run"
	@echo "make gpu-wheels the wheels and tokenizer a bare GPU machine needs for gpu-check, into .whl/"
	@echo "make local-sagemaker  run the entrypoint as SageMaker does (env, /opt/ml/model) and send /invocations"
	@echo "make install-deploy   the deploy scripts' virtualenv (.venv-deploy, SageMaker SDK v2)"
	@echo "make docker-build / docker-run / docker-test   build, run (SageMaker-style) and smoke-test the image with docker"
	@echo "make image-test build the image with buildah (no daemon) and run it the way SageMaker does"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt requirements-model.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-model.txt
	touch $@

$(VENV)/.installed-test: requirements-test.txt requirements-clients.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-test.txt
	$(BIN)/pip install --quiet --no-deps -r requirements-clients.txt
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# deploy/*.py need the SageMaker SDK v2, whose pins (packaging<25, attrs<26) clash with the runtime venv: own venv.
DEPLOY_VENV ?= .venv-deploy
DEPLOY_BIN := $(abspath $(DEPLOY_VENV))/bin

$(DEPLOY_VENV)/.installed: requirements-deploy.txt
	$(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_BIN)/pip install --quiet --upgrade pip
	$(DEPLOY_BIN)/pip install --quiet -r requirements-deploy.txt
	touch $@

install-deploy: $(DEPLOY_VENV)/.installed

run: install
	PATH="$(BIN):$$PATH" container/entrypoint.sh serve

test: install-test install-deploy
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

LINTED := serve deploy container scripts tests

lint: install-test
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

# The SageMaker container contract without docker: tiny model (also in make test), then the embedded SmolLM2.
local-sagemaker: install-test
	$(BIN)/python -m pytest tests/deploy/test_local_sagemaker.py $(PYTEST_ARGS)

test-slow: install-test
	$(BIN)/python -m pytest -m "slow" $(PYTEST_ARGS)

bench: install-test
	$(BIN)/python scripts/bench/run.py

# One script for a bare GPU machine (there: python3 scripts/gpu/check.py OUT after installing .whl/, see
# scripts/gpu/fetch_wheels.sh); without CUDA it runs every stage on tiny shapes on the CPU and says so.
OUT_DIR ?= gpu-check-out
gpu-check: install-test
	$(BIN)/python scripts/gpu/check.py $(OUT_DIR)

gpu-wheels: install
	PYTHON=$(BIN)/python scripts/gpu/fetch_wheels.sh

# --- The image. Production build and run with docker (docs/deploy.md). ---
DOCKER ?= docker
IMAGE ?= sagemaker-llm-serve:latest
DOCKER_BUILD_ARGS ?=
IMAGE_CACHE_DIR ?= $(HOME)/.cache/sagemaker-llm-serve/image
MODEL_DIR ?= $(IMAGE_CACHE_DIR)/model
MESSAGES_API_ENABLED ?= true
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
# no GPU: SM_NUM_GPUS is left unset and the server runs on the CPU
SM_NUM_GPUS ?= $(if $(HAS_GPU),$(shell nvidia-smi -L | wc -l))

docker-build:
	$(DOCKER) build $(DOCKER_BUILD_ARGS) -t $(IMAGE) .

# Mounts MODEL_DIR at /opt/ml/model (the embedded SmolLM2 exported there unless MODEL_DIR is given); HF_MODEL_ID,
# when set in the calling shell, is passed through and wins.
docker-run: install
	@[ "$(origin MODEL_DIR)" != "file" ] || $(BIN)/python scripts/image/export_model.py $(MODEL_DIR)
	$(DOCKER) run --rm --name sagemaker-llm-serve $(if $(HAS_GPU),--gpus all) -p $(SAGEMAKER_BIND_TO_PORT):8080 \
		-e HF_MODEL_ID -e HF_TOKEN $(if $(SM_NUM_GPUS),-e SM_NUM_GPUS=$(SM_NUM_GPUS)) -e MESSAGES_API_ENABLED=$(MESSAGES_API_ENABLED) \
		-v $(abspath $(MODEL_DIR)):/opt/ml/model:ro $(IMAGE) serve

docker-test: install-test
	$(BIN)/python scripts/image/smoke.py --url http://localhost:$(SAGEMAKER_BIND_TO_PORT)

# --- The same Dockerfile built and run here without a daemon (buildah, Debian base, CPU torch). ---
TEST_IMAGE ?= localhost/sagemaker-llm-serve:cpu-test

image-test: install-test install-deploy
	scripts/image/tools.sh
	IMAGE_CACHE_DIR=$(IMAGE_CACHE_DIR) scripts/image/base.sh
	IMAGE_CACHE_DIR=$(IMAGE_CACHE_DIR) IMAGE=$(TEST_IMAGE) PIP=$(BIN)/pip scripts/image/build.sh
	buildah containers --format '{{.ContainerName}}' | grep '^image-test-' | xargs -r buildah rm >/dev/null  # left by a killed run
	SERVE_TEST_IMAGE=$(TEST_IMAGE) $(BIN)/python -m pytest tests/image -s --durations=8 -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) .pytest_cache
