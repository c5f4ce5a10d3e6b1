"""Clients that hang up mid-stream, before the first token and while queued: their work stops, others go on."""

from __future__ import annotations

import json
import re
import socket
import threading

import pytest
import requests

from tests.hardening.conftest import LONG, gauge, healthy
from tests.helpers import sse_data, streamed_chat, wait_for

pytestmark = pytest.mark.e2e

CHAT = streamed_chat(LONG)


def open_stream(url: str) -> requests.Response:
    response = requests.post(url + "/v1/chat/completions", json=CHAT, stream=True, timeout=60)
    assert response.status_code == 200
    return response


def cancelled_ids(log: str) -> list[str]:
    """Requests the disconnect watcher cancelled, in order."""
    return re.findall(r"client of request (\w+) disconnected; cancelling it", log)


def read_rest(lines, into: list) -> None:
    into.extend(line.decode() for line in lines)


def cancellations(server) -> int:
    return server.log().count("outcome=cancelled")


def test_drops_while_queued_and_mid_stream_cancel_and_others_finish(hardened_server):
    url = hardened_server.url
    keeper, dropped = open_stream(url), open_stream(url)  # both cache slots busy (MAX_BATCH_SIZE=2)
    keeper_lines, dropped_lines = keeper.iter_lines(), dropped.iter_lines()
    next(keeper_lines), next(dropped_lines), next(dropped_lines)
    kept: list = []
    reader = threading.Thread(target=read_rest, args=(keeper_lines, kept))
    reader.start()
    assert wait_for(lambda: gauge(hardened_server, "serve_batch_current_size") == 2, timeout=10)
    watched_before, cancelled_before = len(cancelled_ids(hardened_server.log())), cancellations(hardened_server)

    queued = open_stream(url)  # the third admitted request waits for a slot; nothing is written to it meanwhile
    assert wait_for(lambda: gauge(hardened_server, "serve_queue_size") == 1, timeout=10)
    queued.close()  # a FIN: the watcher probes (a keep-alive write), the reset that answers it cancels the request
    assert wait_for(lambda: gauge(hardened_server, "serve_queue_size") == 0, timeout=2.0)
    assert gauge(hardened_server, "serve_batch_current_size") == 2  # it never took a slot: cancelled while queued
    assert wait_for(lambda: len(cancelled_ids(hardened_server.log())) == watched_before + 1, timeout=5)

    dropped.close()  # mid-stream (a FIN is confirmed by the reset that answers the next token's write)
    assert wait_for(lambda: gauge(hardened_server, "serve_batch_current_size") == 1, timeout=2.0)
    assert wait_for(lambda: cancellations(hardened_server) == cancelled_before + 2, timeout=5)

    reader.join(300)
    data = sse_data("\n".join(kept))
    assert data[-1] == "[DONE]" and json.loads(data[-2])["usage"]["completion_tokens"] == LONG  # unaffected
    assert wait_for(lambda: gauge(hardened_server, "serve_batch_current_size") == 0, timeout=1.0)
    assert wait_for(lambda: gauge(hardened_server, "serve_requests_in_flight") == 0, timeout=5)
    healthy(hardened_server)


def test_drop_before_the_first_byte_cancels(hardened_server):
    before = cancellations(hardened_server)
    body = json.dumps({"inputs": "Hi", "parameters": {"max_new_tokens": LONG, "ignore_eos": True}}).encode()
    head = (
        "POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", hardened_server.port)) as sock:
        sock.sendall(head.encode() + body)  # and hang up without reading a byte
    assert wait_for(lambda: cancellations(hardened_server) == before + 1, timeout=5)
    assert wait_for(lambda: gauge(hardened_server, "serve_batch_current_size") == 0, timeout=1.0)
    healthy(hardened_server)


def test_non_streaming_client_that_leaves_is_cancelled(hardened_server):
    """A non-streaming request writes nothing until it is done; the watcher still notices the client left."""
    url = hardened_server.url
    before = len(cancelled_ids(hardened_server.log()))
    with pytest.raises(requests.Timeout):
        requests.post(
            url + "/generate",
            json={"inputs": "Hi", "parameters": {"max_new_tokens": LONG, "ignore_eos": True}},
            timeout=(5, 0.3),
        )
    assert wait_for(lambda: len(cancelled_ids(hardened_server.log())) > before, timeout=5)
    assert wait_for(lambda: gauge(hardened_server, "serve_batch_current_size") == 0, timeout=1.0)
    healthy(hardened_server)
