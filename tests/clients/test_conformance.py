"""What real OpenAI clients send, through real gunicorn: logit_bias, prompt lists and token ids, lm-eval-style prompt
scoring, OpenAI's 400s, TGI's response_format/tool_choice spellings, truncated forced calls, messages without
content."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

PROMPT = "The capital of France is"
USER = [{"role": "user", "content": "Add two and three."}]
CALC = {
    "type": "function",
    "function": {
        "name": "calc",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"enum": [1, 2, 3]}, "b": {"enum": [1, 2, 3]}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
VERDICT = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


def token_ids(server, text: str) -> list[int]:
    return [token["id"] for token in requests.post(server.url + "/tokenize", json={"inputs": text}, timeout=30).json()]


def greedy(openai_client, **fields):
    return openai_client.completions.create(
        **{"model": "tgi", "prompt": PROMPT, "temperature": 0, "extra_body": {"ignore_eos": True}, **fields}
    )


# 3. logit_bias


def test_logit_bias_bans_and_forces_tokens(openai_client, tiny_server):
    plain = greedy(openai_client, max_tokens=3, logprobs=0)
    first = plain.choices[0].logprobs.tokens[0]
    first_id = requests.post(
        tiny_server.url + "/generate",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 1, "details": True}},
        timeout=60,
    ).json()["details"]["tokens"][0]["id"]
    banned = greedy(openai_client, max_tokens=3, logprobs=0, logit_bias={str(first_id): -100})
    assert banned.choices[0].logprobs.tokens[0] != first
    forced_id = token_ids(tiny_server, " blue")[-1]
    forced = greedy(openai_client, max_tokens=3, logprobs=0, logit_bias={str(forced_id): 100})
    assert forced.choices[0].logprobs.tokens == [" blue"] * 3
    chat = openai_client.chat.completions.create(
        model="tgi",
        messages=USER,
        max_tokens=2,
        temperature=0.9,
        seed=1,
        logit_bias={str(forced_id): 100},
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].message.content == " blue blue"  # sampling too: +100 leaves no other choice


def test_logit_bias_is_per_request_in_one_batch(openai_client, tiny_server):
    ids = {word: token_ids(tiny_server, word)[-1] for word in (" blue", " red", " green", " cat")}

    def forced(word: str) -> str:
        return greedy(openai_client, max_tokens=4, logit_bias={str(ids[word]): 100}).choices[0].text

    with ThreadPoolExecutor(4) as pool:
        texts = dict(zip(ids, pool.map(forced, ids)))
    assert texts == {word: word * 4 for word in ids}


@pytest.mark.parametrize(
    "bias, words",
    [
        ({"bad": "x"}, "logit_bias"),
        ({"12": 101}, "outside [-100, 100]"),
        ({"hello": 1}, "not a token id"),
        ({"99999999": -100}, "outside the vocabulary"),
    ],
)
def test_malformed_logit_bias_is_a_400_naming_it(openai_client, bias, words):
    for call in (
        lambda: greedy(openai_client, max_tokens=1, logit_bias=bias),
        lambda: openai_client.chat.completions.create(model="tgi", messages=USER, max_tokens=1, logit_bias=bias),
    ):
        with pytest.raises(openai.BadRequestError) as raised:
            call()
        assert raised.value.body["param"].startswith("logit_bias") and words in raised.value.body["message"]


# 4. batched and token-id prompts


def test_token_id_prompts_and_lists_of_prompts(openai_client, tiny_server):
    single = {prompt: greedy(openai_client, prompt=prompt, max_tokens=3) for prompt in ("Hi", "Hello")}
    batch = greedy(openai_client, prompt=["Hi", "Hello"], max_tokens=3, n=2)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]  # prompt p's i-th choice is p * n + i, as OpenAI
    assert [c.text for c in batch.choices] == [single["Hi"].choices[0].text] * 2 + [single["Hello"].choices[0].text] * 2
    assert batch.usage.prompt_tokens == single["Hi"].usage.prompt_tokens + single["Hello"].usage.prompt_tokens
    assert batch.usage.completion_tokens == 12
    ids = [token_ids(tiny_server, "Hi"), token_ids(tiny_server, "Hello")]
    as_ids = greedy(openai_client, prompt=ids, max_tokens=3)
    assert [c.text for c in as_ids.choices] == [single["Hi"].choices[0].text, single["Hello"].choices[0].text]
    one = greedy(openai_client, prompt=ids[1], max_tokens=3, echo=True)
    assert one.choices[0].text == "Hello" + single["Hello"].choices[0].text


def test_streamed_list_of_prompts(openai_client):
    texts: dict[int, str] = {}
    chunks = list(
        greedy(openai_client, prompt=["Hi", "Hello"], max_tokens=3, stream=True, stream_options={"include_usage": True})
    )
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    batch = greedy(openai_client, prompt=["Hi", "Hello"], max_tokens=3)
    assert (
        texts == {c.index: c.text for c in batch.choices} and chunks[-1].usage.total_tokens == batch.usage.total_tokens
    )


@pytest.mark.parametrize(
    "prompt, param", [([5, 99999999], "prompt"), ([[5], [99999999]], "prompt[1]"), ([[]], "prompt"), ([], "prompt")]
)
def test_bad_prompts_are_400s(openai_client, prompt, param):
    with pytest.raises(openai.BadRequestError) as raised:
        greedy(openai_client, prompt=prompt, max_tokens=1)
    assert raised.value.body["param"].startswith(param)


# 5. scoring as lm-eval-harness does it


def test_echo_scoring_with_max_tokens_zero(openai_client, tiny_server):
    scored = openai_client.completions.create(model="tgi", prompt=PROMPT, echo=True, logprobs=3, max_tokens=0)
    choice, lp = scored.choices[0], scored.choices[0].logprobs
    assert choice.text == PROMPT and scored.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert len(lp.tokens) == scored.usage.prompt_tokens and "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert value <= 0 and top[token] == pytest.approx(value) and 3 <= len(top) <= 4
        assert max(top.values()) >= value
    details = requests.post(
        tiny_server.url + "/generate",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 1, "details": True, "decoder_input_details": True}},
        timeout=60,
    ).json()["details"]
    assert [t["logprob"] for t in details["prefill"]][1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)


def test_echo_scoring_with_generated_tokens_and_logprobs_zero(openai_client):
    scored = greedy(openai_client, echo=True, logprobs=0, max_tokens=2)
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == scored.usage.prompt_tokens + 2 and scored.choices[0].text == "".join(lp.tokens)
    assert lp.token_logprobs[0] is None and all(value <= 0 for value in lp.token_logprobs[1:])
    assert all(
        list(top) == [token] for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:])
    )  # logprobs 0: the token itself
    streamed = list(
        openai_client.completions.create(model="tgi", prompt=PROMPT, echo=True, logprobs=1, max_tokens=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == PROMPT
    assert (
        streamed[0].choices[0].logprobs.token_logprobs[0] is None
        and len(streamed[0].choices[0].logprobs.tokens) == len(lp.tokens) - 2
    )


def test_max_tokens_zero_needs_echo(openai_client):
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.completions.create(model="tgi", prompt=PROMPT, max_tokens=0)
    assert raised.value.body["param"] == "max_tokens"


# 6. OpenAI's error shape and status


def test_invalid_requests_are_openai_400s(openai_client, tiny_server):
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(model="tgi", messages=USER, temperature=9)
    assert raised.value.status_code == 400 and raised.value.body["type"] == "invalid_request_error"
    assert raised.value.body["param"] == "temperature" and "temperature" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(model="tgi", messages=USER, stream_options={"include_usage": True})
    assert raised.value.body["param"] == "stream_options"
    raw = requests.post(tiny_server.url + "/v1/completions", json={"prompt": PROMPT, "top_p": 0}, timeout=30)
    assert raw.status_code == 400 and set(raw.json()["error"]) == {"message", "type", "param", "code"}
    tgi = requests.post(tiny_server.url + "/generate", json={"inputs": PROMPT, "parameters": {"top_p": 0}}, timeout=30)
    assert tgi.status_code == 422 and set(tgi.json()) == {"error", "error_type"}  # TGI's routes keep TGI's


# 7. TGI's spellings of structured output and tools


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "value": {"name": "verdict", "schema": VERDICT}},
        {"type": "json_schema", "value": VERDICT},
        {"type": "json", "value": VERDICT},
        {"type": "json_object", "value": VERDICT},
    ],
)
def test_tgi_response_formats_enforce_the_schema(tiny_server, response_format):
    body = {"messages": USER, "max_tokens": 40, "temperature": 0, "response_format": response_format}
    response = requests.post(tiny_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["choices"][0]["message"]["content"])["answer"] in ("yes", "no")


def test_tool_choice_as_a_bare_function_name(tiny_server):
    body = {"messages": USER, "max_tokens": 60, "temperature": 0, "tools": [CALC], "tool_choice": "calc"}
    choice = requests.post(tiny_server.url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    assert choice["message"]["content"] is None and choice["message"]["tool_calls"][0]["function"]["name"] == "calc"
    unknown = requests.post(tiny_server.url + "/v1/chat/completions", json={**body, "tool_choice": "nope"}, timeout=60)
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "tool_choice"


# 8. a forced call cut by max_tokens


def test_truncated_forced_call_comes_back_as_a_partial_call(openai_client):
    kwargs = dict(
        model="tgi",
        messages=USER,
        max_tokens=12,
        temperature=0,
        tools=[CALC],
        tool_choice={"type": "function", "function": {"name": "calc"}},
    )
    cut = openai_client.chat.completions.create(**kwargs)
    choice = cut.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "calc" and '"name"' not in call.function.arguments
    full = openai_client.chat.completions.create(**{**kwargs, "max_tokens": 80}).choices[0].message.tool_calls[0]
    assert full.function.arguments.replace(" ", "").startswith(call.function.arguments.replace(" ", ""))
    deltas = [c.choices[0] for c in openai_client.chat.completions.create(**kwargs, stream=True) if c.choices]
    streamed = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]  # the name first, then the arguments
    assert streamed and streamed[0].function.name == "calc"
    assert "".join(part.function.arguments or "" for part in streamed) == call.function.arguments
    assert deltas[-1].finish_reason == "length" and not "".join(d.delta.content or "" for d in deltas)


def test_langchain_bind_tools_with_a_cut_call(tiny_server):
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(
        base_url=tiny_server.url + "/v1", api_key="unused", model="tgi", max_tokens=8, temperature=0, max_retries=0
    )
    message = model.bind_tools([CALC], tool_choice="calc").invoke("Add two and three.")
    assert message.response_metadata["finish_reason"] == "length" and message.content == ""
    calls = message.tool_calls + message.invalid_tool_calls
    assert [call["name"] for call in calls] == ["calc"]
    complete = ChatOpenAI(
        base_url=tiny_server.url + "/v1", api_key="unused", model="tgi", max_tokens=80, temperature=0, max_retries=0
    )
    answer = complete.bind_tools([CALC], tool_choice="calc").invoke("Add two and three.")
    assert answer.tool_calls[0]["name"] == "calc" and set(answer.tool_calls[0]["args"]) >= {"a", "b"}


# 9. messages without content


@pytest.mark.parametrize(
    "messages, param",
    [
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "system"}, {"role": "user", "content": "Hi"}], "messages[0].content"),
        ([{"role": "user", "content": "Hi"}, {"role": "assistant"}], "messages[1].content"),
    ],
)
def test_messages_without_content_are_400s(openai_client, messages, param):
    with pytest.raises(openai.BadRequestError) as raised:
        openai_client.chat.completions.create(model="tgi", messages=messages, max_tokens=1)
    assert raised.value.body["param"] == param and param in raised.value.body["message"]


def test_assistant_tool_call_without_content_is_served(openai_client):
    call = {"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": '{"a": 2, "b": 3}'}}
    messages = USER + [
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    response = openai_client.chat.completions.create(model="tgi", messages=messages, max_tokens=2, tools=[CALC])
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")
