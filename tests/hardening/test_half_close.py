"""Issue 16.6: a client that half-closes its socket after the request (shutdown of its write side) still reads the
whole answer; only a client that really left is cancelled (tests/hardening/test_disconnects.py)."""

from __future__ import annotations

import json
import socket

import pytest

from tests.hardening.conftest import healthy
from tests.helpers import sse_data, streamed_chat

pytestmark = pytest.mark.e2e

TOKENS = 12


def half_closed_exchange(port: int, path: str, body: dict) -> tuple[int, bytes]:
    """Send the request, shut the write side, read until the server closes; the final status and body."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head + payload)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    while received.startswith(b"HTTP/1.1 100 "):  # interim responses (the server's probe of a FIN) come first
        received = received.split(b"\r\n\r\n", 1)[1]
    head_bytes, _, rest = received.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head_bytes.lower():
        rest = dechunk(rest)
    return status, rest


def dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def test_half_closed_client_gets_the_whole_completion(hardened_server):
    body = {"prompt": "Hello", "max_tokens": TOKENS, "ignore_eos": True}
    status, answer = half_closed_exchange(hardened_server.port, "/v1/completions", body)
    assert status == 200, answer[:300]
    completion = json.loads(answer)
    assert completion["usage"]["completion_tokens"] == TOKENS
    assert completion["choices"][0]["finish_reason"] == "length"
    healthy(hardened_server)


def test_half_closed_client_gets_the_whole_stream(hardened_server):
    body = streamed_chat(TOKENS)
    status, answer = half_closed_exchange(hardened_server.port, "/v1/chat/completions", body)
    assert status == 200, answer[:300]
    data = sse_data(answer.decode())
    assert data[-1] == "[DONE]", data[-3:]
    assert json.loads(data[-2])["usage"]["completion_tokens"] == TOKENS
    reasons = [c["finish_reason"] for d in data[:-2] for c in json.loads(d)["choices"] if c["finish_reason"]]
    assert reasons == ["length"]


def test_half_closed_tgi_stream_queued_before_its_first_token(hardened_server):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": TOKENS, "ignore_eos": True, "details": True}}
    status, answer = half_closed_exchange(hardened_server.port, "/generate_stream", body)
    assert status == 200, answer[:300]
    events = [json.loads(d) for d in sse_data(answer.decode())]
    assert len(events) == TOKENS and events[-1]["details"]["finish_reason"] == "length"
