"""Shared fixtures: the embedded model (converted once), a tiny random Llama, an engine and Flask clients."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve.app import create_app
from serve.wiring import single_engine
from serve.config import Settings
from serve.engine import Engine
from serve.loading.source import embedded_model_file, gguf_to_folder
from tests.helpers import TINY_KV_TOKENS, build_tiny_llama, start_server


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped on machines without CUDA (CI, the development machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def embedded_folder() -> Path:
    """The embedded SmolLM2 GGUF converted to a safetensors folder (cached across runs, like the server does)."""
    return gguf_to_folder(embedded_model_file(), Settings().cache_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_folder) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), embedded_folder)


@pytest.fixture(scope="session")
def slow_model_dir(tmp_path_factory, embedded_folder) -> Path:
    """A deep tiny Llama (32 layers; ~8 ms a token on a fast 2-core host against ~0.8 ms for the 2-layer one), for
    tests whose generations must outlast a window they drive (a deadline, a client leaving), however fast the host."""
    return build_tiny_llama(tmp_path_factory.mktemp("slow-llama"), embedded_folder, layers=32, hidden=128)


@pytest.fixture(scope="session")
def tiny_settings(tiny_model_dir) -> Settings:
    # A KV pool of 16k tokens (1024 blocks, ~16 MB here), not the default 20% of free RAM: that is zeroed at every
    # engine start and stays resident; a dozen engines in one test process ran the machine out of memory.
    return Settings(
        model_id=str(tiny_model_dir),
        model_dir="/nonexistent",
        max_concurrent_requests=8,
        max_batch_total_tokens=TINY_KV_TOKENS,
        dtype="float32",  # not "auto": the suite asserts the same tokens and weight layout on every host
    )


@pytest.fixture(scope="session")
def tiny_engine(tiny_settings) -> Engine:
    engine = single_engine(tiny_settings)
    engine.start()
    assert engine.wait_ready(120), f"tiny engine failed to load: {engine.load_error}"
    yield engine
    engine.stop()


@pytest.fixture
def client(tiny_settings, tiny_engine):
    """A Flask test client speaking TGI on /invocations (MESSAGES_API_ENABLED off)."""
    return create_app(tiny_settings, tiny_engine).test_client()


@pytest.fixture
def messages_client(tiny_settings, tiny_engine):
    """A Flask test client with MESSAGES_API_ENABLED on."""
    from dataclasses import replace

    return create_app(replace(tiny_settings, messages_api_enabled=True), tiny_engine).test_client()


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """Real gunicorn (the entrypoint) on the tiny random Llama, shared by tests/clients and tests/container: each
    start costs seconds of CPU. Tests that change its state undo it; the log is shared, so count, don't just find."""
    env = {
        "HF_MODEL_ID": str(tiny_model_dir),
        "MAX_CONCURRENT_REQUESTS": "16",
        "MAX_BATCH_TOTAL_TOKENS": str(TINY_KV_TOKENS),  # it lives all session: a small pool, not 20% of free RAM
    }
    server = start_server(env, tmp_path_factory.mktemp("tiny-server-logs"))
    yield server
    server.stop()
