"""The client libraries against ``tiny_server`` (tests/conftest.py: real gunicorn on the tiny random Llama)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def openai_client(tiny_server):
    from openai import OpenAI

    return OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
