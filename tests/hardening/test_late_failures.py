"""Failures after admission release what the request holds; chunked bodies past the limit are refused, never cut."""

from __future__ import annotations

import json

import pytest
import requests

from tests.hardening.conftest import LONG, gauge, healthy
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

SEVEN_MIB = 7 * 1024 * 1024


def test_streamed_chat_with_a_lone_surrogate_model_holds_no_admission_place(hardened_server):
    """Issue 16.1: the SSE writer failed on ``model`` after admission (500), and its n choices kept every place."""
    body = (
        '{"model": "\\ud800", "stream": true, "n": 3, "max_tokens": %d, "ignore_eos": true, '
        '"messages": [{"role": "user", "content": "Hi"}]}' % LONG
    )
    response = requests.post(
        hardened_server.url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code in (400, 422), response.text[:300]
    assert "model" in response.json()["error"]["message"]
    assert wait_for(lambda: gauge(hardened_server, "serve_requests_in_flight") == 0, timeout=2)
    plain = requests.post(
        hardened_server.url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "n": 3},
        timeout=60,
    )
    assert plain.status_code == 200, plain.text  # all three places are free (MAX_CONCURRENT_REQUESTS=3)
    healthy(hardened_server)


def _chunks(total: int, size: int = 256 * 1024):
    sent = 0
    while sent < total:
        piece = min(size, total - sent)
        sent += piece
        yield b" " * piece


def test_chunked_body_past_the_limit_is_413_not_served_cut(hardened_server):
    """Issue 16.4: without Content-Length Werkzeug stopped reading at 6 MiB and served the first 6 MiB."""
    head = b'{"inputs": "Hello", "parameters": {"max_new_tokens": 2}}'

    def body():
        yield head
        yield from _chunks(SEVEN_MIB)

    response = requests.post(
        hardened_server.url + "/generate", data=body(), headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 413, response.text[:300]
    assert "larger than" in response.json()["error"]
    healthy(hardened_server)


def test_chunked_body_within_the_limit_is_served(hardened_server):
    payload = json.dumps({"inputs": "Hello", "parameters": {"max_new_tokens": 2}}).encode()

    def body():
        yield payload
        yield from _chunks(6 * 1024 * 1024 - len(payload))  # exactly the limit: JSON allows trailing whitespace

    response = requests.post(
        hardened_server.url + "/generate", data=body(), headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 200, response.text[:300]
    assert isinstance(response.json()["generated_text"], str)


def test_failure_while_rendering_a_stream_cancels_what_it_admitted(client, tiny_engine, monkeypatch):
    """Any failure after admission (here the second role chunk of n=2 fails to render) releases every choice."""
    from serve.http.schemas import openai as oa

    real, calls = oa.chat_chunk, []

    def fails_on_the_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("rendering failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(oa, "chat_chunk", fails_on_the_second_chunk)
    chat = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": LONG,
        "ignore_eos": True,
        "stream": True,
        "n": 2,
    }
    response = client.post("/v1/chat/completions", json=chat, buffered=False)
    assert response.status_code == 200
    assert tiny_engine.scheduler.in_flight == 2
    with pytest.raises(RuntimeError, match="rendering failed"):
        b"".join(response.response)
    response.close()  # what the WSGI server does with a response whose iteration failed
    assert wait_for(lambda: tiny_engine.scheduler.in_flight == 0, timeout=5)
