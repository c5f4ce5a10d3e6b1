"""OpenAI routes through the Flask app on a tiny random Llama."""

import json

import pytest

from tests.helpers import sse_data

CHAT = {
    "model": "tgi",
    "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "max_tokens": 8,
}


def test_chat_completion_shape(client):
    response = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0})
    assert response.status_code == 200, response.json
    body = response.json
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["created"] > 0
    assert body["model"] == "tgi"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5 and 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert int(response.headers["x-generated-tokens"]) == usage["completion_tokens"]


def test_chat_stream_chunks_and_done(client):
    response = client.post(
        "/v1/chat/completions",
        json={**CHAT, "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}},
    )
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    data = sse_data(response.get_data(as_text=True))
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["object"] == "chat.completion.chunk"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8


def test_stream_equals_non_stream_text(client):
    request = {**CHAT, "temperature": 0, "max_tokens": 12, "ignore_eos": True}
    whole = client.post("/v1/chat/completions", json=request).json["choices"][0]["message"]["content"]
    chunks = [
        json.loads(d)
        for d in sse_data(client.post("/v1/chat/completions", json={**request, "stream": True}).get_data(as_text=True))[
            :-1
        ]
    ]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == whole


def test_content_parts_are_accepted(client):
    """Text parts reach the prompt joined: the same prompt and the same greedy answer as the plain string."""
    greedy = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "deep learning?"}]
    as_parts, as_text = (
        client.post("/v1/chat/completions", json={**greedy, "messages": [{"role": "user", "content": content}]})
        for content in (parts, "What is deep learning?")
    )
    assert as_parts.status_code == 200 and as_text.status_code == 200, as_parts.json
    usage, expected = as_parts.json["usage"], as_text.json["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (expected["prompt_tokens"], 6)
    assert as_parts.json["choices"][0]["message"] == as_text.json["choices"][0]["message"]


def test_completions(client):
    response = client.post(
        "/v1/completions", json={"model": "x", "prompt": "Hello", "max_tokens": 5, "temperature": 0, "echo": True}
    )
    assert response.status_code == 200
    body = response.json
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"][0]["text"].startswith("Hello") and body["usage"]["completion_tokens"] <= 5


def test_completions_stream(client):
    response = client.post(
        "/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "stream": True, "ignore_eos": True}
    )
    data = sse_data(response.get_data(as_text=True))
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["choices"][0]["finish_reason"] == "length"


def test_models_lists_the_served_model(client, tiny_model_dir):
    body = client.get("/v1/models").json
    assert body["object"] == "list" and body["data"][0]["id"] == str(tiny_model_dir)


def test_unknown_fields_are_ignored(client):
    """Extras OpenAI clients send (top level and per message) change nothing: the same prompt, the same answer."""
    plain = {**CHAT, "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    messages = [{**message, "x_note": "ignored", "weight": 3} for message in CHAT["messages"]]
    extras = {"user": "abc", "parallel_tool_calls": False, "store": False, "metadata": {"k": "v"}, "x_future": [1]}
    with_extras = client.post("/v1/chat/completions", json={**plain, **extras, "messages": messages})
    without = client.post("/v1/chat/completions", json=plain)
    assert with_extras.status_code == 200 and without.status_code == 200, with_extras.json
    usage, expected = with_extras.json["usage"], without.json["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (expected["prompt_tokens"], 6)
    assert with_extras.json["choices"][0]["message"] == without.json["choices"][0]["message"]


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"model": "tgi"}, 400, "messages"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
        ({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}, 400, "content"),
        ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ({**CHAT, "max_tokens": -3}, 400, "max_tokens"),
        ({**CHAT, "max_tokens": 100000}, 400, "MAX_TOTAL_TOKENS"),
        ({**CHAT, "temperature": "hot"}, 400, "temperature"),
        ({**CHAT, "temperature": 9}, 400, "temperature"),
        ({**CHAT, "top_p": 0}, 400, "top_p"),
        ({**CHAT, "n": 17}, 400, "n"),
        ({**CHAT, "stop": ["x"] * 100}, 400, "stop"),
        ({"messages": [{"role": "user", "content": "word " * 600}]}, 400, "MAX_INPUT_TOKENS"),
    ],
)
def test_bad_chat_requests_name_the_problem(client, body, status, field):
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.json
    error = response.json["error"]
    assert field in error["message"] and error["type"] and "Traceback" not in error["message"]


def test_bad_json_and_empty_body(client):
    bad = client.post("/v1/chat/completions", data="{not json", content_type="application/json")
    assert bad.status_code == 400 and "not valid JSON" in bad.json["error"]["message"]
    empty = client.post("/v1/chat/completions", data="", content_type="application/json")
    assert empty.status_code == 400 and "empty" in empty.json["error"]["message"]
    array = client.post("/v1/chat/completions", json=[1, 2])
    assert array.status_code == 400 and "JSON object" in array.json["error"]["message"]


def test_streaming_request_is_validated_before_the_stream(client):
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "max_tokens": 0})
    assert (
        response.status_code == 400 and response.mimetype == "application/json"
    )  # OpenAI's status for invalid requests


def test_body_over_six_mib_is_413(client):
    response = client.post("/v1/chat/completions", data=b"x" * (6 * 1024 * 1024 + 10), content_type="application/json")
    assert response.status_code == 413 and "limit" in response.json["error"]["message"]


def test_unknown_route_and_method(client):
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/chat/completions").status_code == 405


def test_default_length_is_capped_when_max_tokens_is_omitted(tiny_settings, tiny_engine):
    from dataclasses import replace

    from serve.app import create_app

    capped = create_app(replace(tiny_settings, default_max_new_tokens=7), tiny_engine).test_client()
    body = capped.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "ignore_eos": True}
    ).json
    assert body["usage"]["completion_tokens"] == 7 and body["choices"][0]["finish_reason"] == "length"


def test_overload_is_429_before_any_stream(tiny_settings):
    from dataclasses import replace

    from serve.app import create_app
    from serve.wiring import build_engine

    settings = replace(tiny_settings, max_concurrent_requests=1)
    engine = build_engine(settings).start()  # the pool decides the 429
    assert engine.wait_ready(60), engine.load_error
    try:
        client = create_app(settings, engine).test_client()
        long_stream = client.post(
            "/v1/chat/completions", json={**CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}, buffered=False
        )
        first_chunk = next(long_stream.response)
        assert b"chat.completion.chunk" in first_chunk
        refused = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        assert refused.status_code == 429 and refused.mimetype == "application/json"
        assert "limit is 1" in refused.json["error"]["message"] and refused.json["error"]["type"] == "overloaded"
        long_stream.close()
    finally:
        engine.stop()
