"""Malformed requests on every route of the real server: each gets a 4xx JSON error naming the problem."""

from __future__ import annotations

import json

import pytest
import requests

from tests.hardening.conftest import healthy

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Hi"}]
SEVEN_MIB = 7 * 1024 * 1024
JSON = {"Content-Type": "application/json"}


def chat(**fields):
    return {"messages": USER, "max_tokens": 2, **fields}


def gen(**parameters):
    return {"inputs": "Hello", "parameters": {"max_new_tokens": 2, **parameters}}


# (id, method, path, body: bytes | JSON value, extra headers, expected status, words the message must contain)
CASES = [
    ("json-truncated", "POST", "/invocations", b"{", JSON, 400, "not valid JSON"),
    ("json-trailing-comma", "POST", CHAT, b'{"messages": [],}', JSON, 400, "not valid JSON"),
    ("empty-body-completions", "POST", "/v1/completions", b"", JSON, 400, "empty"),
    ("empty-body-generate", "POST", "/generate", b"", JSON, 400, "empty"),
    ("blank-body-tokenize", "POST", "/tokenize", b"  \n ", JSON, 400, "empty"),
    ("array-body", "POST", "/generate_stream", b"[1, 2]", JSON, 400, "JSON object"),
    ("string-body", "POST", CHAT, b'"hello"', JSON, 400, "JSON object"),
    ("null-body", "POST", "/invocations", b"null", JSON, 400, "JSON object"),
    (
        "form-content-type",
        "POST",
        CHAT,
        b"messages=hi&max_tokens=3",
        {"Content-Type": "application/x-www-form-urlencoded"},
        415,
        "Content-Type: application/json",
    ),
    (
        "text-content-type",
        "POST",
        "/generate",
        b"tell me a story",
        {"Content-Type": "text/plain"},
        415,
        "Content-Type: application/json",
    ),
    (
        "json-sent-as-text",
        "POST",
        "/generate",
        json.dumps(gen()).encode(),
        {"Content-Type": "text/plain"},
        415,
        "Content-Type: application/json",
    ),
    (
        "json-sent-as-text-chat",
        "POST",
        CHAT,
        json.dumps(chat()).encode(),
        {"Content-Type": "text/plain; charset=utf-8"},
        415,
        "Content-Type: application/json",
    ),
    ("json-as-problem-json", "POST", "/tokenize", b"[]", {"Content-Type": "application/problem+json"}, 400, "object"),
    ("invalid-utf8", "POST", "/generate", b'{"inputs": "\xff\xfe\xfa"}', JSON, 400, "UTF-8"),
    ("lone-surrogate", "POST", "/generate", b'{"inputs": "a\\ud800b"}', JSON, 422, "inputs"),
    (
        "lone-surrogate-content",
        "POST",
        CHAT,
        b'{"messages": [{"role": "user", "content": "a\\udc00"}]}',
        JSON,
        (400, 422),
        "messages.0.content",
    ),
    (
        "lone-surrogate-content-part",
        "POST",
        CHAT,
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
        JSON,
        (400, 422),
        "messages.0.content.0.text",
    ),
    (
        "lone-surrogate-model-stream",
        "POST",
        CHAT,
        b'{"model": "\\ud800", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}',
        JSON,
        (400, 422),
        "model",
    ),
    ("lone-surrogate-prompt", "POST", "/v1/completions", b'{"prompt": "x\\ud800"}', JSON, (400, 422), "prompt"),
    (
        "lone-surrogate-invocations-messages",
        "POST",
        "/invocations",
        b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
        JSON,
        (400, 422),
        "messages.0.content",
    ),
    ("lone-surrogate-tokenize", "POST", "/tokenize", b'{"inputs": "\\ud800"}', JSON, 422, "inputs"),
    (
        "lone-surrogate-stop",
        "POST",
        "/generate",
        b'{"inputs": "Hi", "parameters": {"stop": ["\\ud800"]}}',
        JSON,
        422,
        "parameters.stop.0",
    ),
    ("seven-mib-chat", "POST", CHAT, b"x" * SEVEN_MIB, JSON, 413, "larger than"),
    (
        "seven-mib-invocations",
        "POST",
        "/invocations",
        json.dumps({"inputs": "a" * SEVEN_MIB}).encode(),
        JSON,
        413,
        "larger than",
    ),
    ("nested-arrays", "POST", "/invocations", b"[" * 100_000 + b"]" * 100_000, JSON, 400, "nested"),
    (
        "nested-objects",
        "POST",
        CHAT,
        b'{"messages": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}",
        JSON,
        400,
        "nested",
    ),
    (
        "integer-5000-digits",
        "POST",
        CHAT,
        b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": ' + b"9" * 5000 + b"}",
        JSON,
        400,
        "digits",
    ),
    (
        "nan-temperature",
        "POST",
        CHAT,
        b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
        JSON,
        400,
        "temperature",
    ),
    ("infinity-top-p", "POST", "/v1/completions", b'{"prompt": "Hi", "top_p": Infinity}', JSON, 400, "top_p"),
    (
        "overflow-float",
        "POST",
        CHAT,
        b'{"messages": [{"role": "user", "content": "Hi"}], "frequency_penalty": 1e400}',
        JSON,
        400,
        "frequency_penalty",
    ),
    ("messages-string", "POST", CHAT, {"messages": "Hi"}, {}, 400, "messages"),
    ("messages-empty", "POST", CHAT, {"messages": []}, {}, 400, "messages"),
    ("messages-missing", "POST", CHAT, {"max_tokens": 3}, {}, 400, "messages"),
    ("unknown-role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "Hi"}]}, {}, 400, "role"),
    ("message-not-object", "POST", CHAT, {"messages": ["Hi"]}, {}, 400, "messages[0]"),
    (
        "unknown-content-part",
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "hologram", "data": "x"}]}]},
        {},
        400,
        "content",
    ),
    (
        "content-part-without-text",
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        {},
        400,
        "text",
    ),
    ("content-number", "POST", CHAT, {"messages": [{"role": "user", "content": 42}]}, {}, 400, "content"),
    ("max-tokens-negative", "POST", CHAT, chat(max_tokens=-1), {}, 400, "max_tokens"),
    ("max-tokens-zero", "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 0}, {}, 400, "max_tokens"),
    ("max-tokens-fraction", "POST", CHAT, chat(max_tokens=1.5), {}, 400, "max_tokens"),
    ("max-tokens-beyond-context", "POST", CHAT, chat(max_tokens=100_000), {}, 400, "MAX_TOTAL_TOKENS"),
    ("max-tokens-huge", "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 10**30}, {}, 400, "max_tokens"),
    ("temperature-too-high", "POST", CHAT, chat(temperature=5), {}, 400, "temperature"),
    ("temperature-string", "POST", CHAT, chat(temperature="hot"), {}, 400, "temperature"),
    ("top-p-zero", "POST", "/v1/completions", {"prompt": "Hi", "top_p": 0}, {}, 400, "top_p"),
    ("seed-beyond-64-bits", "POST", CHAT, chat(seed=2**70, temperature=1.0), {}, 400, "seed"),
    ("seed-string", "POST", CHAT, chat(seed="lucky"), {}, 400, "seed"),
    ("n-zero", "POST", CHAT, chat(n=0), {}, 400, "n"),
    ("stop-10k-strings", "POST", CHAT, chat(stop=[f"s{i}" for i in range(10_000)]), {}, 400, "stop"),
    ("stop-string-too-long", "POST", "/v1/completions", {"prompt": "Hi", "stop": "x" * 10_000}, {}, 400, "stop"),
    ("stop-numbers", "POST", CHAT, chat(stop=[1, 2]), {}, 400, "stop"),
    ("stream-options-string", "POST", CHAT, chat(stream=True, stream_options="yes"), {}, 400, "stream_options"),
    ("prompt-beyond-max-input", "POST", "/v1/completions", {"prompt": "hello " * 500}, {}, 400, "MAX_INPUT_TOKENS"),
    (
        "messages-beyond-max-input",
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": "hi"}] * 300},
        {},
        400,
        "MAX_INPUT_TOKENS",
    ),
    ("chat-stream-invalid-is-json-not-stream", "POST", CHAT, chat(stream=True, top_p=7), {}, 400, "top_p"),
    ("prompt-list-mixed", "POST", "/invocations", {"prompt": ["a", 1]}, {}, 422, "prompt"),
    ("prompt-token-id-outside-vocab", "POST", "/v1/completions", {"prompt": [1, 2, 10**9]}, {}, 400, "vocabulary"),
    ("prompt-empty-list", "POST", "/v1/completions", {"prompt": []}, {}, 400, "prompt"),
    ("message-without-content", "POST", CHAT, {"messages": [{"role": "user"}]}, {}, 400, "messages[0].content"),
    ("logit-bias-bad-key", "POST", CHAT, chat(logit_bias={"bad": "x"}), {}, 400, "logit_bias"),
    (
        "logit-bias-outside-vocab",
        "POST",
        "/v1/completions",
        {"prompt": "Hi", "logit_bias": {"99999999": 1}},
        {},
        400,
        "logit_bias",
    ),
    (
        "stream-options-without-stream",
        "POST",
        CHAT,
        chat(stream_options={"include_usage": True}),
        {},
        400,
        "stream_options",
    ),
    (
        "response-format-json-without-value",
        "POST",
        CHAT,
        chat(response_format={"type": "json"}),
        {},
        400,
        "response_format",
    ),
    ("invocations-unknown-shape", "POST", "/invocations", {"question": "Hi"}, {}, 422, "inputs"),
    ("inputs-empty", "POST", "/generate", {"inputs": ""}, {}, 422, "inputs"),
    ("inputs-number", "POST", "/invocations", {"inputs": 5}, {}, 422, "inputs"),
    ("inputs-beyond-max-input", "POST", "/generate", {"inputs": "hello " * 500}, {}, 422, "MAX_INPUT_TOKENS"),
    ("parameters-string", "POST", "/generate", {"inputs": "Hi", "parameters": "fast"}, {}, 422, "parameters"),
    ("max-new-tokens-negative", "POST", "/generate", gen(max_new_tokens=-5), {}, 422, "max_new_tokens"),
    ("max-new-tokens-beyond-context", "POST", "/generate", gen(max_new_tokens=5000), {}, 422, "MAX_TOTAL_TOKENS"),
    ("tgi-top-k-zero", "POST", "/generate", gen(top_k=0), {}, 422, "top_k"),
    ("tgi-temperature-zero", "POST", "/generate", gen(temperature=0), {}, 422, "temperature"),
    ("tgi-truncate-negative", "POST", "/generate", gen(truncate=-1), {}, 422, "truncate"),
    ("tgi-seed-negative", "POST", "/generate", gen(seed=-3, do_sample=True), {}, 422, "seed"),
    ("tgi-stop-10k", "POST", "/generate_stream", gen(stop=["x"] * 10_000), {}, 422, "stop"),
    ("tgi-stream-invalid-is-json", "POST", "/generate_stream", gen(top_p=3), {}, 422, "top_p"),
    (
        "grammar-regex-unbalanced",
        "POST",
        "/generate",
        gen(grammar={"type": "regex", "value": "(ab"}),
        {},
        422,
        "grammar",
    ),
    (
        "grammar-regex-not-string",
        "POST",
        "/generate",
        gen(grammar={"type": "regex", "value": {"a": 1}}),
        {},
        422,
        "grammar",
    ),
    (
        "grammar-schema-bad-type",
        "POST",
        "/generate",
        gen(grammar={"type": "json", "value": {"type": "nonsense"}}),
        {},
        422,
        "grammar",
    ),
    (
        "grammar-unknown-kind",
        "POST",
        "/generate_stream",
        gen(grammar={"type": "xml", "value": "<a/>"}),
        {},
        422,
        "grammar",
    ),
    (
        "response-format-bad-schema",
        "POST",
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}),
        {},
        400,
        "response_format",
    ),
    (
        "response-format-missing-schema",
        "POST",
        CHAT,
        chat(response_format={"type": "json_schema"}),
        {},
        400,
        "response_format",
    ),
    ("response-format-unknown", "POST", CHAT, chat(response_format={"type": "yaml"}), {}, 400, "response_format"),
    ("tokenize-number", "POST", "/tokenize", {"inputs": 123}, {}, 422, "inputs"),
    ("tokenize-missing", "POST", "/tokenize", {}, {}, 422, "inputs"),
    ("wrong-method-chat", "GET", CHAT, None, {}, 405, "GET"),
    ("wrong-method-ping", "POST", "/ping", b"{}", JSON, 405, "POST"),
    ("unknown-route", "GET", "/v2/secrets", None, {}, 404, "/v2/secrets"),
    ("path-traversal", "GET", "/static/../../etc/passwd", None, {}, 404, "not found"),
]


@pytest.mark.parametrize("name, method, path, body, headers, status, words", CASES, ids=[case[0] for case in CASES])
def test_malformed_request_gets_a_clear_4xx(hardened_server, name, method, path, body, headers, status, words):
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    response = requests.request(method, hardened_server.url + path, data=data, headers=headers, timeout=60)
    expected = status if isinstance(status, tuple) else (status,)
    assert response.status_code in expected, (response.status_code, response.text[:500])
    assert response.headers["Content-Type"].startswith("application/json")
    assert "Traceback" not in response.text
    error = response.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert words.lower() in message.lower(), message


def test_matrix_is_large_and_covers_every_post_route():
    assert len(CASES) >= 40
    routes = {path for _, method, path, *_ in CASES if method == "POST"}
    assert {"/invocations", CHAT, "/v1/completions", "/generate", "/generate_stream", "/tokenize"} <= routes


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63)])
def test_seeds_at_the_ends_of_the_range_are_served(hardened_server, seed):
    """torch's generators take -2**63 .. 2**64-1; n choices use seed, seed+1, ... which must stay in range."""
    body = chat(seed=seed, temperature=1.0, n=2)
    response = requests.post(hardened_server.url + CHAT, json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2


def test_server_is_healthy_after_the_matrix(hardened_server):
    healthy(hardened_server)
    assert "unhandled error" not in hardened_server.log()
