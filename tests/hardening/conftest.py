"""One real gunicorn server on the tiny Llama, shared by the hardening tests that leave it running.

Small limits on purpose: an admission cap of 3 (so 4x overload is 12 clients), two cache slots (so a third request
queues), a short default length (so fuzzed requests that set no max_tokens finish fast).
"""

from __future__ import annotations

import pytest
import requests

from tests.helpers import Server, start_server, wait_for

HARDENED_ENV = {
    "MAX_CONCURRENT_REQUESTS": "3",
    "MAX_BATCH_SIZE": "2",
    "MAX_INPUT_TOKENS": "64",
    "MAX_TOTAL_TOKENS": "512",
    "DEFAULT_MAX_NEW_TOKENS": "8",
}
LONG = 440  # tokens: a few seconds of generation on the deep tiny model, long enough to drop or interrupt


@pytest.fixture(scope="session")
def hardened_server(slow_model_dir, tmp_path_factory) -> Server:
    server = start_server({"HF_MODEL_ID": str(slow_model_dir), **HARDENED_ENV}, tmp_path_factory.mktemp("hardened"))
    yield server
    server.stop()


def healthy(server: Server) -> None:
    """The server still answers /ping, ends what its answered clients left running, and serves an ordinary
    request."""
    assert requests.get(server.url + "/ping", timeout=10).status_code == 200
    drained(server)
    response = requests.post(
        server.url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["generated_text"], str)


def drained(server: Server, timeout: float = 60.0) -> None:
    """Every admitted request ends soon after its client was answered or left (cancellations are asynchronous, and a
    loaded machine is slow); the log's tail says what ran last when one stays."""
    if not wait_for(lambda: gauge(server, "serve_requests_in_flight") == 0, timeout=timeout, interval=0.1):
        tail = "\n".join(server.log().splitlines()[-40:])
        in_flight = gauge(server, "serve_requests_in_flight")
        raise AssertionError(f"{in_flight:.0f} requests still in flight {timeout:.0f} s on; the log ends:\n{tail}")


def gauge(server: Server, name: str) -> float:
    """The current value of one unlabelled gauge in /metrics."""
    for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")
