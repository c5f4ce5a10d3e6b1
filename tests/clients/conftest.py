"""A real gunicorn server on the tiny random Llama, shared by the client-library tests of this folder."""

from __future__ import annotations

import pytest

from tests.helpers import start_server


@pytest.fixture(scope="package")
def tiny_server(tiny_model_dir, tmp_path_factory):
    server = start_server(
        {"HF_MODEL_ID": str(tiny_model_dir), "MAX_CONCURRENT_REQUESTS": "16"}, tmp_path_factory.mktemp("logs")
    )
    yield server
    server.stop()


@pytest.fixture(scope="package")
def openai_client(tiny_server):
    from openai import OpenAI

    return OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
