"""Issue 16.3: limits come before work. A prompt that cannot fit MAX_INPUT_TOKENS is refused before it is tokenized."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.hardening.conftest import healthy
from tests.hardening.test_overload import worker_rss_bytes

pytestmark = pytest.mark.e2e

BIG = "hello world " * 500_000  # 6,000,000 characters, just under the 6 MiB body limit once in JSON
CASES = [
    ("/v1/completions", {"prompt": BIG, "max_tokens": 2}, "prompt"),
    ("/generate", {"inputs": BIG, "parameters": {"max_new_tokens": 2}}, "inputs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": BIG}], "max_tokens": 2}, "messages"),
    ("/tokenize", {"inputs": BIG}, "inputs"),
]


def _message(response: requests.Response) -> str:
    error = response.json()["error"]
    return error["message"] if isinstance(error, dict) else error


def test_huge_prompts_are_refused_before_tokenizing_and_ping_stays_fast(hardened_server):
    results: dict[str, tuple[requests.Response, float]] = {}

    def send(path: str, body: dict) -> None:
        started = time.monotonic()
        response = requests.post(hardened_server.url + path, json=body, timeout=120)
        results[path] = (response, time.monotonic() - started)

    threads = [threading.Thread(target=send, args=(path, body)) for path, body, _ in CASES]
    pings: list[float] = []
    rss_before = worker_rss_bytes(hardened_server)
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        started = time.monotonic()
        assert requests.get(hardened_server.url + "/ping", timeout=10).status_code == 200
        pings.append(time.monotonic() - started)
        time.sleep(0.05)
    for path, _, field in CASES:
        response, took = results[path]
        assert response.status_code in (400, 422), (path, response.status_code, response.text[:200])
        message = _message(response)
        assert field in message and "MAX_INPUT_TOKENS=64" in message and "characters" in message, message
        print(f"{path}: refused in {took:.2f} s")
    grown = worker_rss_bytes(hardened_server) - rss_before
    print(f"/ping: {len(pings)} probes, slowest {max(pings, default=0):.3f} s; worker RSS grew {grown / 2**20:.0f} MiB")
    assert max(pings, default=0) < 2.0
    assert grown < 256 * 2**20  # tokenizing them whole took ~1.4 GB each at peak, and 3.8 GB of three stayed
    healthy(hardened_server)


def test_tokenize_is_bounded_by_max_input_tokens(hardened_server):
    response = requests.post(hardened_server.url + "/tokenize", json={"inputs": "hello " * 200}, timeout=60)
    assert response.status_code == 422, response.text[:200]
    assert "MAX_INPUT_TOKENS=64" in _message(response)
    small = requests.post(hardened_server.url + "/tokenize", json={"inputs": "hello world"}, timeout=60)
    assert small.status_code == 200 and [t["text"] for t in small.json()][-2:] == ["hello", " world"]


def test_truncate_serves_a_long_input_by_its_tail(hardened_server):
    """TGI's ``truncate`` keeps the last tokens, so a long input is served; only its tail is tokenized."""
    body = {"inputs": "hello " * 100_000, "parameters": {"max_new_tokens": 2, "truncate": 16}}
    started = time.monotonic()
    response = requests.post(hardened_server.url + "/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text[:300]
    assert response.headers["x-prompt-tokens"] == "16"
    print(f"truncate over 600,000 characters: {time.monotonic() - started:.2f} s")
