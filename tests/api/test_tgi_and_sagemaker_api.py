"""TGI routes and SageMaker's /ping and /invocations through the Flask app on a tiny random Llama."""

import json
import threading

from serve.app import create_app
from serve.engine import Engine, EngineConfig
from tests.helpers import TINY_KV_TOKENS, sse_data

GENERATE = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6, "ignore_eos": True}}


def test_generate(client):
    response = client.post("/generate", json={**GENERATE, "parameters": {**GENERATE["parameters"], "details": True}})
    assert response.status_code == 200
    body = response.json
    assert isinstance(body["generated_text"], str)
    assert body["details"]["finish_reason"] == "length" and body["details"]["generated_tokens"] == 6
    assert response.headers["x-prompt-tokens"] and response.headers["x-queue-time"]


def test_generate_return_full_text(client):
    body = client.post(
        "/generate", json={**GENERATE, "parameters": {"max_new_tokens": 3, "return_full_text": True}}
    ).json
    assert body["generated_text"].startswith(GENERATE["inputs"])


def test_generate_stream_tgi_events(client):
    response = client.post("/generate_stream", json=GENERATE)
    events = [json.loads(item) for item in sse_data(response.get_data(as_text=True))]
    assert len(events) == 6 and all(event["token"]["id"] is not None for event in events)
    assert all(event["generated_text"] is None for event in events[:-1])
    assert events[-1]["generated_text"] == "".join(event["token"]["text"] for event in events)


def test_invocations_tgi_mode_returns_a_list(client):
    response = client.post("/invocations", json=GENERATE)
    assert response.status_code == 200 and isinstance(response.json, list) and "generated_text" in response.json[0]


def test_invocations_tgi_mode_also_takes_messages_and_prompt(client):
    chat = client.post("/invocations", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert chat.status_code == 200 and chat.json["object"] == "chat.completion"
    completion = client.post("/invocations", json={"prompt": "Hi", "max_tokens": 3})
    assert completion.status_code == 200 and completion.json["object"] == "text_completion"


def test_invocations_stream_in_tgi_mode(client):
    response = client.post("/invocations", json={**GENERATE, "stream": True})
    assert (
        response.mimetype == "text/event-stream"
        and json.loads(sse_data(response.get_data(as_text=True))[-1])["generated_text"] is not None
    )


def test_invocations_messages_api(messages_client):
    response = messages_client.post(
        "/invocations", json={"messages": [{"role": "user", "content": "What is deep learning?"}], "max_tokens": 4}
    )
    assert response.status_code == 200 and response.json["choices"][0]["message"]["role"] == "assistant"
    streamed = messages_client.post(
        "/invocations", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    )
    assert sse_data(streamed.get_data(as_text=True))[-1] == "[DONE]"


def test_invocations_messages_api_rejects_inputs(messages_client):
    response = messages_client.post("/invocations", json=GENERATE)
    assert response.status_code == 422
    assert "messages" in response.json["error"] and response.json["error_type"] == "validation"


def test_tgi_errors_are_tgi_shaped(client):
    response = client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 0}})
    assert response.status_code == 422 and "max_new_tokens" in response.json["error"] and response.json["error_type"]
    missing = client.post("/invocations", json={"parameters": {}})
    assert missing.status_code == 422 and "inputs" in missing.json["error"]
    too_long = client.post("/generate", json={"inputs": "word " * 600})
    assert too_long.status_code == 422 and "MAX_INPUT_TOKENS" in too_long.json["error"]


def test_truncate_keeps_the_last_tokens(client):
    response = client.post(
        "/generate",
        json={"inputs": "word " * 600, "parameters": {"truncate": 100, "max_new_tokens": 2, "details": True}},
    )
    assert response.status_code == 200 and int(response.headers["x-prompt-tokens"]) == 100


def test_info_health_tokenize(client, tiny_model_dir):
    info = client.get("/info").json
    assert (
        info["model_id"] == str(tiny_model_dir) and info["max_total_tokens"] == 512 and info["max_input_tokens"] == 511
    )
    assert info["compile"]["enabled"] is False and info["compile"]["reason"] == "off (COMPILE=false)"
    assert info["cpu_weights"].startswith("panel kernel (AVX")  # the tiny lean model's float32 weights
    assert info["cuda_graphs"]["enabled"] is False and info["engines"] == [
        {"devices": ["cpu"], "in_flight": 0, "served": info["engines"][0]["served"]}
    ]
    assert info["async_scheduling"]["enabled"] is False and "CPU" in info["async_scheduling"]["reason"]
    assert info["cuda_graphs"]["mixed"] == {**info["cuda_graphs"]["mixed"], "enabled": False, "buckets": []}
    assert "no CUDA device" in info["cuda_graphs"]["mixed"]["reason"]
    assert client.get("/health").status_code == 200
    tokens = client.post("/tokenize", json={"inputs": "Hello world"}).json
    assert "".join(token["text"] for token in tokens) == "Hello world" and all("id" in token for token in tokens)


def test_ping_is_503_until_the_model_is_loaded(tiny_settings, tiny_engine):
    release = threading.Event()

    def gated_load():
        release.wait(10)
        return tiny_engine.loaded

    # a 16k-token KV pool, not the default 20% of free RAM, and stopped: it would stay resident for the whole suite
    engine = Engine(load=gated_load, config=EngineConfig(max_batch_total_tokens=TINY_KV_TOKENS))
    app = create_app(tiny_settings, engine)
    try:
        client = app.test_client()
        assert client.get("/ping").status_code == 503
        assert client.post("/invocations", json=GENERATE).status_code == 503
        release.set()
        assert engine.wait_ready(10)
        assert client.get("/ping").status_code == 200
    finally:
        release.set()
        engine.stop()


def test_metrics_count_requests_tokens_and_engine_state(client):
    client.post("/generate", json=GENERATE)
    text = client.get("/metrics").get_data(as_text=True)
    assert 'serve_requests_total{route="/generate",status="200"}' in text
    assert "serve_generated_tokens_total" in text and "serve_time_to_first_token_seconds_bucket" in text
    assert "serve_batch_current_size 0.0" in text and "serve_queue_size 0.0" in text and "serve_ready 1.0" in text
    client.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 0}})
    assert 'serve_requests_total{route="/generate",status="422"}' in client.get("/metrics").get_data(as_text=True)
