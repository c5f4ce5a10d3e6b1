"""SIGTERM to the container's process: /ping turns 503, new requests get 503, in-flight requests finish, exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import requests

from tests.hardening.conftest import gauge
from tests.helpers import sse_data, start_server, streamed_chat, wait_for

pytestmark = pytest.mark.e2e

TOKENS = 30  # short: the drain deadline is 22 s even on a machine busy enough to take 0.3 s a token
GRACEFUL_TIMEOUT = 25  # serve.config.Settings.graceful_timeout, below SageMaker's 30 s SIGKILL


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(tiny_model_dir, tmp_path):
    server = start_server({"HF_MODEL_ID": str(tiny_model_dir), "MAX_CONCURRENT_REQUESTS": "4"}, tmp_path)
    try:
        chat = streamed_chat(TOKENS)
        streaming = requests.post(server.url + "/v1/chat/completions", json=chat, stream=True, timeout=60)
        lines = streaming.iter_lines()
        next(lines)
        blocking: list = []
        generate = {"inputs": "Hello", "parameters": {"max_new_tokens": TOKENS, "ignore_eos": True}}
        waiter = threading.Thread(
            target=lambda: blocking.append(requests.post(server.url + "/generate", json=generate, timeout=60))
        )
        waiter.start()
        assert wait_for(lambda: gauge(server, "serve_requests_in_flight") == 2, timeout=10)
        kept_alive = requests.Session()
        assert kept_alive.get(server.url + "/ping", timeout=10).status_code == 200

        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)  # the entrypoint exec'd gunicorn: this is the container's PID 1
        assert wait_for(lambda: requests.get(server.url + "/ping", timeout=10).status_code == 503, timeout=5)
        ping = requests.get(server.url + "/ping", timeout=10)
        assert ping.json() == {"status": "draining"}
        assert kept_alive.get(server.url + "/ping", timeout=10).status_code == 503  # on a connection opened before
        for path, body in (
            ("/v1/chat/completions", {**chat, "stream": False}),
            ("/generate", generate),
            ("/invocations", generate),
        ):
            refused = requests.post(server.url + path, json=body, timeout=10)
            assert refused.status_code == 503, (path, refused.text)
            error = refused.json()["error"]
            assert "shutting down" in (error["message"] if isinstance(error, dict) else error)

        data = sse_data("\n".join(line.decode() for line in lines))
        assert data[-1] == "[DONE]" and json.loads(data[-2])["usage"]["completion_tokens"] == TOKENS
        waiter.join(60)
        assert blocking[0].status_code == 200 and blocking[0].headers["x-generated-tokens"] == str(TOKENS)
        assert server.process.wait(GRACEFUL_TIMEOUT + 5) == 0
        print(f"SIGTERM to exit: {time.monotonic() - started:.1f} s")
        assert time.monotonic() - started < 30
        log = server.log()
        assert "SIGTERM: draining; 2 request(s) in flight" in log and "drained in" in log
    finally:
        server.stop()
