"""Servers shared by several modules of this folder (each gunicorn start costs seconds of CPU)."""

from __future__ import annotations

import pytest

from tests.helpers import start_server


@pytest.fixture(scope="package")
def replica_server(tiny_model_dir, tmp_path_factory):
    """PLACEMENT=replicas: two engines behind one worker (test_replicas, then test_runtime_adapters' replica test)."""
    env = {
        "HF_MODEL_ID": str(tiny_model_dir),
        "PLACEMENT": "replicas",
        "REPLICAS": "2",
        "MAX_CONCURRENT_REQUESTS": "8",
        "MAX_BATCH_TOTAL_TOKENS": "4096",
        "DTYPE": "float32",
        "SERVE_CACHE_DIR": str(tmp_path_factory.mktemp("replica-cache")),
        "LORA_ADAPTER_ROOTS": str(tmp_path_factory.getbasetemp()),  # test_runtime_adapters' adapters
    }
    server = start_server(env, tmp_path_factory.mktemp("logs"), timeout=300)
    yield server
    server.stop()
