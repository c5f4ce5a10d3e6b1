"""The real ``openai`` client against real gunicorn serving a tiny random Llama: every parity feature it exposes."""

from __future__ import annotations

import json

import jsonschema
import pytest

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is deep learning?"},
]
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["answer", "score"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                "unit": {"type": "string", "enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def test_chat_sync_and_stream_agree(openai_client):
    sync = openai_client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(
        openai_client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=12, temperature=0, stream=True)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert sync.choices[0].message.content == streamed
    assert (
        sync.choices[0].finish_reason
        == [c for c in chunks if c.choices and c.choices[0].finish_reason][0].choices[0].finish_reason
    )
    assert (
        sync.usage.completion_tokens >= 1
        and sync.usage.total_tokens == sync.usage.prompt_tokens + sync.usage.completion_tokens
    )


def test_n_choices_sync_and_stream(openai_client):
    sync = openai_client.chat.completions.create(
        model="tgi", messages=MESSAGES, max_tokens=6, n=2, seed=3, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in sync.choices] == [0, 1]
    assert sync.usage.completion_tokens == 12
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in openai_client.chat.completions.create(
        model="tgi", messages=MESSAGES, max_tokens=6, n=2, seed=3, stream=True, extra_body={"ignore_eos": True}
    ):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    assert texts == {c.index: c.message.content for c in sync.choices}  # same seeds, same choices


def test_logprobs_and_top_logprobs(openai_client):
    response = openai_client.chat.completions.create(
        model="tgi", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert "".join(entry.token for entry in content) == response.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(values[0])  # greedy
        assert entry.bytes == list(entry.token.encode())


def test_logprobs_stream_with_each_token(openai_client):
    chunks = list(
        openai_client.chat.completions.create(
            model="tgi",
            messages=MESSAGES,
            max_tokens=4,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    entries = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert len(entries) == 4 and all(len(entry.top_logprobs) == 2 for entry in entries)


def test_seed_reproduces_sampled_text(openai_client):
    def sample(seed):
        return (
            openai_client.chat.completions.create(
                model="tgi",
                messages=MESSAGES,
                max_tokens=16,
                temperature=1.0,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .message.content
        )

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_response_format_json_schema_validates(openai_client):
    response = openai_client.chat.completions.create(
        model="tgi",
        messages=MESSAGES,
        max_tokens=60,
        temperature=0.7,
        seed=5,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "verdict", "schema": ANSWER_SCHEMA, "strict": True},
        },
    )
    jsonschema.validate(json.loads(response.choices[0].message.content), ANSWER_SCHEMA)
    assert response.choices[0].finish_reason == "stop"


def test_response_format_json_object(openai_client):
    response = openai_client.chat.completions.create(
        model="tgi", messages=MESSAGES, max_tokens=30, temperature=0, response_format={"type": "json_object"}
    )
    text = response.choices[0].message.content
    if response.choices[0].finish_reason == "stop":  # a random model may run out of tokens inside a long string
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")


def test_named_tool_choice_returns_a_valid_call(openai_client):
    response = openai_client.chat.completions.create(
        model="tgi",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        max_tokens=60,
        temperature=0,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_tool_choice_calls_one_of_the_tools_and_streams(openai_client):
    kwargs = dict(
        model="tgi",
        messages=[{"role": "user", "content": "What time is it?"}],
        max_tokens=60,
        temperature=0.8,
        seed=11,
        tools=[WEATHER, TIME],
        tool_choice="required",
    )
    call = openai_client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    schemas = {"get_weather": WEATHER, "get_time": TIME}
    jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name]["function"]["parameters"])
    deltas = [
        d
        for c in openai_client.chat.completions.create(stream=True, **kwargs)
        if c.choices
        for d in (c.choices[0].delta.tool_calls or [])
    ]
    assert deltas and deltas[0].function.name == call.function.name
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments


def test_tool_results_are_accepted_on_the_next_turn(openai_client):
    first = openai_client.chat.completions.create(
        model="tgi",
        messages=[{"role": "user", "content": "Weather in Tokyo?"}],
        max_tokens=60,
        temperature=0,
        tools=[WEATHER],
        tool_choice="required",
    )
    call = first.choices[0].message.tool_calls[0]
    question = {"role": "user", "content": "Weather in Tokyo?"}
    asked = {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}

    def follow_up(*history, max_tokens=1):
        return openai_client.chat.completions.create(
            model="tgi",
            max_tokens=max_tokens,
            temperature=0,
            tools=[WEATHER],
            messages=[question, *history],
            extra_body={"ignore_eos": True},
        )

    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}
    answered = follow_up(asked, result, max_tokens=8)
    choice = answered.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None and choice.message.content
    assert answered.usage.completion_tokens == 8
    # the call and its result are both in the prompt: each adds tokens, a longer result adds more
    longer = follow_up(asked, {**result, "content": '{"temperature": 21, "sky": "clear"}'})
    call_only, question_only = follow_up(asked).usage.prompt_tokens, follow_up().usage.prompt_tokens
    assert longer.usage.prompt_tokens > answered.usage.prompt_tokens > call_only > question_only


def test_stream_options_include_usage(openai_client):
    chunks = list(
        openai_client.chat.completions.create(
            model="tgi",
            messages=MESSAGES,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_with_logprobs_n_and_echo(openai_client):
    response = openai_client.completions.create(
        model="tgi",
        prompt="The sky is",
        max_tokens=4,
        n=2,
        logprobs=2,
        echo=True,
        seed=9,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in response.choices] == [0, 1]
    for choice in response.choices:  # echo with logprobs: the prompt's tokens are listed (and scored) first, as OpenAI
        assert choice.text.startswith("The sky is") and "".join(choice.logprobs.tokens) == choice.text
        assert (
            len(choice.logprobs.tokens) == response.usage.prompt_tokens + 4 and choice.logprobs.top_logprobs[0] is None
        )
        assert all(len(top) <= 3 for top in choice.logprobs.top_logprobs[1:])  # 2 alternatives and the chosen token
        assert choice.logprobs.text_offset[0] == 0
    assert response.usage.completion_tokens == 8


def test_client_sees_a_400_for_a_bad_schema(openai_client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as raised:
        openai_client.chat.completions.create(
            model="tgi",
            messages=MESSAGES,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 12}}},
        )
    assert "response_format" in str(raised.value)
