"""Issue 16.7: streams still running at the SIGTERM drain deadline end with an in-band error, not silently."""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import pytest
import requests

from tests.hardening.conftest import gauge
from tests.helpers import sse_data, start_server, wait_for

pytestmark = pytest.mark.e2e

STREAMS = 16  # one at a time on the deep tiny model (~4 s each): far longer than the 21 s drain deadline


def test_streams_cut_at_the_drain_deadline_end_with_an_error_event(slow_model_dir, tmp_path):
    env = {"HF_MODEL_ID": str(slow_model_dir), "MAX_BATCH_SIZE": "1", "MAX_CONCURRENT_REQUESTS": "24"}
    server = start_server(env, tmp_path)
    try:
        chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 480, "ignore_eos": True, "stream": True}
        bodies: list[str] = []

        def read_stream() -> None:
            with requests.post(server.url + "/v1/chat/completions", json=chat, stream=True, timeout=60) as response:
                assert response.status_code == 200
                bodies.append("\n".join(line.decode() for line in response.iter_lines()))

        readers = [threading.Thread(target=read_stream) for _ in range(STREAMS)]
        for reader in readers:
            reader.start()
        assert wait_for(lambda: gauge(server, "serve_requests_in_flight") == STREAMS, timeout=20)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for reader in readers:
            reader.join(40)
        assert server.process.wait(35) == 0
        took = time.monotonic() - started
        print(f"SIGTERM to exit with {STREAMS} streams: {took:.1f} s")
        assert took < 30  # SageMaker's SIGKILL

        assert len(bodies) == STREAMS
        cut = [body for body in bodies if sse_data(body)[-1] != "[DONE]"]
        assert cut, "no stream outlasted the drain deadline"
        for body in cut:
            assert "event: error" in body, body[-500:]
            error = json.loads(sse_data(body)[-1])["error"]
            assert "shutting down" in error["message"] and error["code"] == 503
        logged = re.search(
            r"drain deadline reached with \d+ request\(s\) still in flight; cut (\d+) response", server.log()
        )
        assert logged and int(logged.group(1)) == len(cut), server.log()[-3000:]
        assert server.log().count("outcome=cancelled reason=shutdown_deadline") == len(cut)
    finally:
        server.stop()
