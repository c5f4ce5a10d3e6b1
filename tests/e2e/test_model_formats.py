"""Reasoning and tool-call formats end to end: the real engine runs a tiny model that emits each family's format
(tests/e2e/scripted_model.py), and the chat route reads its thoughts, content and calls, whole and streamed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from serve.app import create_app
from serve.config import Settings
from serve.wiring import single_engine
from tests.e2e.scripted_model import build_scripted_model
from tests.helpers import TINY_KV_TOKENS, sse_data

TOOLS = [
    {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
    for name in ("get_weather", "get_time")
]
THOUGHTS = "\nThe user wants the weather and the time in Paris.\n"
CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})]


@pytest.fixture(scope="module")
def scripted_dir(tmp_path_factory, embedded_folder):
    return build_scripted_model(tmp_path_factory.mktemp("scripted"), embedded_folder)


@pytest.fixture(scope="module")
def scripted_settings(scripted_dir) -> Settings:
    return Settings(
        model_id=str(scripted_dir),
        model_dir="/nonexistent",
        max_concurrent_requests=8,
        max_batch_total_tokens=TINY_KV_TOKENS,
        dtype="float32",
        messages_api_enabled=True,
    )


@pytest.fixture(scope="module")
def scripted_engine(scripted_settings):
    engine = single_engine(scripted_settings)
    engine.start()
    assert engine.wait_ready(120), f"scripted engine failed to load: {engine.load_error}"
    yield engine
    engine.stop()


@pytest.fixture
def chat(scripted_settings, scripted_engine):
    """POST a chat body (the trigger as the user's message) with the given parser settings; the JSON answer."""

    def post(trigger: str, status: int = 200, settings: dict | None = None, **body):
        app = create_app(replace(scripted_settings, **(settings or {})), scripted_engine).test_client()
        payload = {"model": "m", "messages": [{"role": "user", "content": f"Hi {trigger}"}], **body}
        response = app.post("/v1/chat/completions", json=payload)
        assert response.status_code == status, response.get_data(as_text=True)
        if body.get("stream"):
            return [json.loads(data) for data in sse_data(response.get_data(as_text=True)) if data != "[DONE]"]
        return response.get_json()

    return post


def reassembled(chunks: list[dict]) -> dict:
    """A streamed choice put together as a client does: texts joined, calls by index, arguments concatenated."""
    message = {"reasoning_content": "", "content": "", "tool_calls": {}, "finish_reason": None}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        delta = choice["delta"]
        message["reasoning_content"] += delta.get("reasoning_content") or ""
        message["content"] += delta.get("content") or ""
        for call in delta.get("tool_calls") or []:
            entry = message["tool_calls"].setdefault(call["index"], {"id": None, "name": None, "arguments": ""})
            assert entry["name"] is not None or "name" in call["function"]  # the name comes first
            entry["id"] = call.get("id") or entry["id"]
            entry["name"] = call["function"].get("name") or entry["name"]
            entry["arguments"] += call["function"]["arguments"]
        message["finish_reason"] = choice["finish_reason"] or message["finish_reason"]
    return message


def test_thoughts_text_and_two_calls_in_one_answer(chat):
    answer = chat("⟦think-call⟧", tools=TOOLS, max_tokens=200)
    (choice,) = answer["choices"]
    message = choice["message"]
    assert message["reasoning_content"] == THOUGHTS and message["content"] == "Let me check both.\n"
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]
    assert calls == CALLS and choice["finish_reason"] == "tool_calls"
    assert len({c["id"] for c in message["tool_calls"]}) == 2


def test_the_same_answer_streamed_as_incremental_deltas(chat):
    from serve.http.schemas.openai import ChatCompletionChunk

    chunks = chat("⟦think-call⟧", tools=TOOLS, max_tokens=200, stream=True)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)  # every chunk is one the documented model allows
    message = reassembled(chunks)
    assert (message["reasoning_content"], message["content"]) == (THOUGHTS, "Let me check both.\n")
    calls = [(call["name"], json.loads(call["arguments"])) for _, call in sorted(message["tool_calls"].items())]
    assert calls == CALLS and message["finish_reason"] == "tool_calls"
    assert all(call["id"].startswith("call_") for call in message["tool_calls"].values())


@pytest.mark.parametrize("stream", [False, True])
def test_a_budget_ending_in_the_thoughts_is_length_with_no_content_and_no_half_marker(chat, stream):
    cut_in_thoughts = 0
    for max_tokens in range(12, 24):  # the cut moves through the end of the thoughts and their end marker
        answer = chat("⟦think-call⟧", tools=TOOLS, max_tokens=max_tokens, stream=stream)
        message = reassembled(answer) if stream else answer["choices"][0]["message"]
        reason = message["finish_reason"] if stream else answer["choices"][0]["finish_reason"]
        thoughts = message["reasoning_content"] or ""
        assert reason == "length" and THOUGHTS.startswith(thoughts), (max_tokens, thoughts)
        if thoughts != THOUGHTS:  # the budget ended in the thoughts or in their end marker
            assert not message["content"], (max_tokens, message["content"])
            cut_in_thoughts += 1
    assert cut_in_thoughts >= 2


def test_a_structured_answer_is_constrained_only_after_the_thoughts(chat):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    message = chat("⟦think-json⟧", response_format=response_format, max_tokens=60)["choices"][0]["message"]
    assert message["reasoning_content"] == "\nA JSON object with the city.\n"
    assert json.loads(message["content"]) == {"city": "Paris"}


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_is_constrained_only_after_the_thoughts(chat, stream):
    weather = {**TOOLS[0]["function"], "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    named = {"type": "function", "function": {"name": "get_weather"}}
    tools = [{"type": "function", "function": weather}]
    answer = chat("⟦think-forced⟧", tools=tools, tool_choice=named, max_tokens=80, stream=stream)
    if stream:
        message = reassembled(answer)
        calls = [(call["name"], json.loads(call["arguments"])) for call in message["tool_calls"].values()]
    else:
        message = answer["choices"][0]["message"]
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]
    assert message["reasoning_content"] == "\nI have to call the tool.\n" and calls == CALLS[:1]
    assert not message["content"]


def test_a_malformed_call_comes_back_as_text(chat):
    (choice,) = chat("⟦bad-call⟧", tools=TOOLS, max_tokens=60)["choices"]
    assert choice["message"]["content"].startswith("<tool_call>") and choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]


def test_template_variables_reach_the_template(chat):
    off = chat("", chat_template_kwargs={"enable_thinking": False}, max_tokens=30)["choices"][0]["message"]
    assert off["content"] == "Paris is sunny today." and "reasoning_content" not in off
    low = chat("", reasoning_effort="low", max_tokens=30)["choices"][0]["message"]
    assert low["content"] == "Quick answer: Paris."
    refused = chat("", 400, chat_template_kwargs={"messages": []})
    assert "chat_template_kwargs" in json.dumps(refused) and "messages" in refused["error"]["message"]


@pytest.mark.parametrize(
    "parser, trigger, content, calls",
    [
        ("mistral", "⟦mistral⟧", None, CALLS[:1]),
        ("llama3_json", "⟦llama3⟧", None, CALLS[:1]),
        ("pythonic", "⟦pythonic⟧", None, CALLS),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_each_family_set_by_tool_call_parser(chat, parser, trigger, content, calls, stream):
    answer = chat(trigger, settings={"tool_call_parser": parser}, tools=TOOLS, max_tokens=60, stream=stream)
    if stream:
        message = reassembled(answer)
        got = [(call["name"], json.loads(call["arguments"])) for _, call in sorted(message["tool_calls"].items())]
        assert message["content"] == (content or "")
    else:
        message = answer["choices"][0]["message"]
        got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]
        assert message["content"] == content
    assert got == calls


def test_info_names_the_parsers_chosen_from_the_template(scripted_settings, scripted_engine):
    info = create_app(scripted_settings, scripted_engine).test_client().get("/info").get_json()
    assert (info["reasoning_parser"], info["tool_call_parser"]) == ("qwen3", "hermes")
    pinned = replace(scripted_settings, reasoning_parser="none", tool_call_parser="mistral")
    info = create_app(pinned, scripted_engine).test_client().get("/info").get_json()
    assert (info["reasoning_parser"], info["tool_call_parser"]) == ("none", "mistral")


@pytest.fixture(scope="module")
def scripted_server(scripted_dir, tmp_path_factory):
    """Real gunicorn (the entrypoint) on the scripted model; the parsers come from its chat template (auto)."""
    from tests.helpers import start_server

    server = start_server({"HF_MODEL_ID": str(scripted_dir)}, tmp_path_factory.mktemp("scripted-logs"))
    yield server
    server.stop()


def test_the_openai_stream_helper_reassembles_thoughts_and_calls(scripted_server):
    from openai import OpenAI

    client = OpenAI(base_url=scripted_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Hi ⟦think-call⟧"}]
    with client.chat.completions.stream(model="m", messages=messages, tools=TOOLS, max_tokens=200) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    (choice,) = final.choices
    calls = [(call.function.name, json.loads(call.function.arguments)) for call in choice.message.tool_calls]
    assert calls == CALLS and choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check both.\n"
    assert choice.message.model_extra["reasoning_content"] == THOUGHTS


def test_langchain_reassembles_streamed_calls(scripted_server):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(base_url=scripted_server.url + "/v1", api_key="unused", model="m", max_tokens=200)
    merged = None
    for chunk in model.bind_tools(TOOLS).stream([HumanMessage("Hi ⟦think-call⟧")]):
        merged = chunk if merged is None else merged + chunk
    assert [(call["name"], call["args"]) for call in merged.tool_calls] == CALLS
    assert len({call["id"] for call in merged.tool_calls}) == 2 and merged.content == "Let me check both.\n"
