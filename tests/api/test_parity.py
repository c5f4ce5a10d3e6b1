"""Every sampling and output parameter through raw HTTP: TGI routes, OpenAI routes, and /invocations both ways."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from serve.app import create_app
from serve.wiring import single_engine
from serve.config import Settings
from tests.helpers import TINY_KV_TOKENS, build_tiny_llama, sse_data

CHAT = {"messages": [{"role": "user", "content": "What is deep learning?"}], "max_tokens": 6}
SAMPLING = {
    "temperature": 0.9,
    "top_p": 1.0,
    "top_k": 40,
    "min_p": 0.01,
    "typical_p": 0.95,
    "repetition_penalty": 1.1,
    "frequency_penalty": 0.5,
    "presence_penalty": 0.5,
    "seed": 7,
}
TGI_SAMPLING = {
    "temperature": 0.9,
    "top_p": 0.99,
    "top_k": 40,
    "typical_p": 0.95,
    "repetition_penalty": 1.1,
    "frequency_penalty": 0.5,
    "seed": 7,
    "do_sample": True,
}


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/invocations"])
def test_openai_sampling_fields_are_accepted_and_seeded(messages_client, route):
    body = {**CHAT, **SAMPLING, "max_completion_tokens": 5, "ignore_eos": True}
    first, second = (messages_client.post(route, json=body) for _ in range(2))
    assert first.status_code == 200, first.json
    assert first.json["choices"][0]["message"]["content"] == second.json["choices"][0]["message"]["content"]
    assert first.json["usage"]["completion_tokens"] == 5  # max_completion_tokens wins over max_tokens


# Each field is observed through its effect on the random model's tokens, so a request path that drops it fails:
# a filter that keeps one token turns seeded sampling into greedy decoding, and a strong penalty turns a greedy
# continuation that repeats itself into another one.
GREEDY_CHAT = {**CHAT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": True}
SAMPLED_CHAT = {**GREEDY_CHAT, "temperature": 1.0, "seed": 11}


def chat_tokens(client, route: str, body: dict) -> list[str]:
    response = client.post(route, json=body)
    assert response.status_code == 200, response.json
    return [entry["token"] for entry in response.json["choices"][0]["logprobs"]["content"]]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/invocations"])
@pytest.mark.parametrize("keep_one", [{"top_k": 1}, {"min_p": 1.0}])
def test_openai_filters_that_keep_one_token_sample_greedily(messages_client, route, keep_one):
    greedy = chat_tokens(messages_client, route, GREEDY_CHAT)
    assert chat_tokens(messages_client, route, SAMPLED_CHAT) != greedy  # sampling alone picks other tokens
    assert chat_tokens(messages_client, route, {**SAMPLED_CHAT, **keep_one}) == greedy


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/invocations"])
@pytest.mark.parametrize(
    "penalty", [{"repetition_penalty": 10.0}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}]
)
def test_openai_penalties_change_a_repeating_greedy_continuation(messages_client, route, penalty):
    greedy = chat_tokens(messages_client, route, GREEDY_CHAT)
    assert len(set(greedy)) < len(greedy), greedy  # it repeats itself, which a penalty must change
    assert chat_tokens(messages_client, route, {**GREEDY_CHAT, **penalty}) != greedy


GREEDY_TGI = {"max_new_tokens": 12, "ignore_eos": True, "details": True}


def tgi_tokens(client, parameters: dict) -> list[int]:
    response = client.post("/generate", json={"inputs": "What is deep learning?", "parameters": parameters})
    assert response.status_code == 200, response.json
    return [token["id"] for token in response.json["details"]["tokens"]]


def test_tgi_top_k_one_samples_greedily(client):
    greedy = tgi_tokens(client, GREEDY_TGI)
    sampled = {**GREEDY_TGI, "do_sample": True, "seed": 11}
    assert tgi_tokens(client, sampled) != greedy
    assert tgi_tokens(client, {**sampled, "top_k": 1}) == greedy


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 10.0}, {"frequency_penalty": 2.0}])
def test_tgi_penalties_change_a_repeating_greedy_continuation(client, penalty):
    greedy = tgi_tokens(client, GREEDY_TGI)
    assert len(set(greedy)) < len(greedy), greedy
    assert tgi_tokens(client, {**GREEDY_TGI, **penalty}) != greedy


OK_SCHEMA = {  # an answer that must be {"ok": true} or {"ok": false}
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


def test_chat_parameters_reach_invocations_with_the_switch_off(client):
    body = {**CHAT, **SAMPLING, "n": 2, "logprobs": True, "top_logprobs": 1, "ignore_eos": True}
    response = client.post("/invocations", json=body)  # MESSAGES_API_ENABLED off: dispatched by the messages key
    assert response.status_code == 200, response.json
    assert [c["index"] for c in response.json["choices"]] == [0, 1]
    assert all(len(c["logprobs"]["content"]) == 6 for c in response.json["choices"])


def test_top_p_one_is_accepted_everywhere(client, messages_client):
    assert messages_client.post("/invocations", json={**CHAT, "top_p": 1.0}).status_code == 200
    assert (
        client.post("/generate", json={"inputs": "Hi", "parameters": {"top_p": 1.0, "max_new_tokens": 2}}).status_code
        == 200
    )


@pytest.mark.parametrize("route", ["/generate", "/invocations"])
def test_tgi_sampling_parameters_and_seed(client, route):
    payload = {
        "inputs": "Hello there",
        "parameters": {**TGI_SAMPLING, "max_new_tokens": 5, "ignore_eos": True, "details": True},
    }
    first, second = (client.post(route, json=payload).json for _ in range(2))
    first, second = (body[0] if isinstance(body, list) else body for body in (first, second))
    assert first["generated_text"] == second["generated_text"] and first["details"]["generated_tokens"] == 5
    assert first["details"]["seed"] == 7


def test_return_full_text_truncate_and_stop(client):
    full = client.post(
        "/generate", json={"inputs": "Hello there", "parameters": {"max_new_tokens": 3, "return_full_text": True}}
    ).json
    assert full["generated_text"].startswith("Hello there")
    plain = client.post(
        "/generate",
        json={"inputs": "Hello there", "parameters": {"max_new_tokens": 12, "ignore_eos": True, "details": True}},
    ).json
    stop = plain["generated_text"][2:5]
    if stop.strip():
        stopped = client.post(
            "/generate",
            json={
                "inputs": "Hello there",
                "parameters": {"max_new_tokens": 12, "ignore_eos": True, "stop": [stop], "details": True},
            },
        ).json
        assert stop not in stopped["generated_text"] and stopped["details"]["finish_reason"] == "stop_sequence"
    truncated = client.post(
        "/generate",
        json={
            "inputs": "one two three four five six",
            "parameters": {"truncate": 2, "max_new_tokens": 1, "decoder_input_details": True, "details": True},
        },
    ).json
    assert len(truncated["details"]["prefill"]) == 2


def test_tgi_details_tokens_prefill_and_top_tokens(client):
    body = client.post(
        "/generate",
        json={
            "inputs": "The sky is",
            "parameters": {"max_new_tokens": 4, "details": True, "decoder_input_details": True, "top_n_tokens": 3},
        },
    ).json
    details = body["details"]
    assert [t["text"] for t in details["tokens"]] and "".join(t["text"] for t in details["tokens"]) == body[
        "generated_text"
    ]
    assert all(set(t) == {"id", "text", "logprob", "special"} for t in details["tokens"])
    assert details["prefill"][0]["logprob"] is None and all(t["logprob"] <= 0 for t in details["prefill"][1:])
    assert all(
        len(top) == 3 and top[0]["id"] == tok["id"] for top, tok in zip(details["top_tokens"], details["tokens"])
    )  # greedy


def test_best_of_returns_the_most_likely_sequence(client):
    payload = {
        "inputs": "Once",
        "parameters": {
            "best_of": 3,
            "do_sample": True,
            "seed": 1,
            "max_new_tokens": 5,
            "details": True,
            "ignore_eos": True,
        },
    }
    body = client.post("/generate", json=payload).json
    others = body["details"]["best_of_sequences"]
    assert len(others) == 2
    best = sum(t["logprob"] for t in body["details"]["tokens"])
    assert all(best >= sum(t["logprob"] for t in other["tokens"]) for other in others)
    assert {other["seed"] for other in others} | {body["details"]["seed"]} == {1, 2, 3}


def test_best_of_rules(client):
    greedy = client.post("/generate", json={"inputs": "x", "parameters": {"best_of": 2}})
    streamed = client.post(
        "/generate", json={"inputs": "x", "stream": True, "parameters": {"best_of": 2, "do_sample": True}}
    )
    assert greedy.status_code == 422 and "best_of" in greedy.json["error"]
    assert streamed.status_code == 422 and "best_of" in streamed.json["error"]


def test_tgi_grammar_json_and_regex(client):
    schema = OK_SCHEMA
    body = client.post(
        "/generate",
        json={"inputs": "Answer:", "parameters": {"max_new_tokens": 20, "grammar": {"type": "json", "value": schema}}},
    ).json
    assert json.loads(body["generated_text"]) in ({"ok": True}, {"ok": False})
    digits = client.post(
        "/invocations",
        json={
            "inputs": "Code:",
            "parameters": {"max_new_tokens": 8, "details": True, "grammar": {"type": "regex", "value": "[0-9]{3}"}},
        },
    ).json
    assert len(digits[0]["generated_text"]) == 3 and digits[0]["generated_text"].isdigit()
    assert digits[0]["details"]["finish_reason"] == "eos_token"  # ends as soon as the grammar is complete


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "(unclosed"}}}, "parameters.grammar"),
        ({"inputs": "x", "parameters": {"grammar": {"type": "json", "value": {"type": 12}}}}, "parameters.grammar"),
        ({"inputs": "x", "parameters": {"grammar": {"type": "yaml", "value": "a"}}}, "parameters.grammar"),
        ({"inputs": "x", "parameters": {"top_n_tokens": 99}}, "top_n_tokens"),
    ],
)
def test_bad_tgi_parameters_name_the_field(client, payload, field):
    response = client.post("/generate", json=payload)
    assert response.status_code == 422 and field in response.json["error"], response.json


@pytest.mark.parametrize(
    "extra, field",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "a"}}],
                "tool_choice": {"type": "function", "function": {"name": "b"}},
            },
            "tool_choice",
        ),
        ({"min_p": 2}, "min_p"),
        ({"typical_p": 0}, "typical_p"),
    ],
)
def test_bad_openai_parameters_name_the_field(messages_client, extra, field):
    response = messages_client.post("/invocations", json={**CHAT, **extra})
    assert response.status_code == 422 and field in response.json["error"], response.json  # TGI's error shape
    response = messages_client.post("/v1/chat/completions", json={**CHAT, **extra})
    assert response.status_code == 400 and field in response.json["error"]["message"], response.json  # OpenAI's


def test_tgi_stream_tokens_carry_logprobs_and_top_tokens(client):
    response = client.post(
        "/generate_stream",
        json={
            "inputs": "Hi",
            "parameters": {"max_new_tokens": 3, "top_n_tokens": 2, "details": True, "ignore_eos": True},
        },
    )
    events = [json.loads(item) for item in sse_data(response.get_data(as_text=True))]
    assert len(events) == 3 and all(e["token"]["logprob"] <= 0 and len(e["top_tokens"]) == 2 for e in events)
    assert events[-1]["details"]["generated_tokens"] == 3 and events[-1]["details"]["input_length"] >= 1


def test_tgi_root_route_serves_generate_and_stream(client):
    assert (
        "generated_text" in client.post("/", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}).json[0]
    )  # TGI's list
    streamed = client.post("/", json={"inputs": "Hi", "stream": True, "parameters": {"max_new_tokens": 2}})
    assert streamed.mimetype == "text/event-stream"


def test_auto_tool_choice_returns_prose_from_a_model_that_does_not_call(messages_client):
    """tool_choice auto (and its default) leaves the random model free: it writes prose, which comes back as content
    (every generated token of it), not as a call nor a grammar-forced JSON envelope."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    for choice_field in ({}, {"tool_choice": "auto"}):
        request = {**CHAT, "tools": tools, "temperature": 0, "ignore_eos": True, "logprobs": True, **choice_field}
        response = messages_client.post("/invocations", json=request)
        assert response.status_code == 200, response.json
        (choice,) = response.json["choices"]
        assert choice["finish_reason"] == "length" and not choice["message"].get("tool_calls"), choice
        tokens = [entry["token"] for entry in choice["logprobs"]["content"]]
        assert len(tokens) == response.json["usage"]["completion_tokens"] == CHAT["max_tokens"]
        assert choice["message"]["content"] == "".join(tokens) and not choice["message"]["content"].startswith("{")


def test_chat_template_setting_overrides_the_models_template(tiny_settings, tiny_engine):
    template = (
        "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}{% if add_generation_prompt %}ANSWER:{% endif %}"
    )
    app = create_app(replace(tiny_settings, chat_template=template), tiny_engine)
    with app.app_context():
        service = app.extensions["serve.service"]
        ids = service.chat_prompt([{"role": "user", "content": "hello"}])
        assert service.tokenizer.decode(ids) == "<<hello>>ANSWER:"


@pytest.fixture(scope="module")
def templateless_client(tmp_path_factory, embedded_folder):
    folder = build_tiny_llama(tmp_path_factory.mktemp("no-template"), embedded_folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    settings = Settings(
        model_id=str(folder), model_dir="/nonexistent", max_concurrent_requests=4, max_batch_total_tokens=TINY_KV_TOKENS
    )
    engine = single_engine(settings).start()
    assert engine.wait_ready(120), engine.load_error
    yield create_app(settings, engine).test_client()
    engine.stop()


def test_a_model_without_chat_template_gets_a_clear_400(templateless_client):
    response = templateless_client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 400
    assert "CHAT_TEMPLATE" in response.json["error"]["message"]
    assert templateless_client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_completions_take_response_format_too(client):
    schema = OK_SCHEMA
    body = client.post(
        "/v1/completions",
        json={
            "prompt": "JSON:",
            "max_tokens": 20,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        },
    ).json
    assert json.loads(body["choices"][0]["text"]) in ({"ok": True}, {"ok": False})
    bad = client.post(
        "/v1/completions",
        json={"prompt": "JSON:", "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 12}}}},
    )
    assert bad.status_code == 400 and "response_format" in bad.json["error"]["message"]
