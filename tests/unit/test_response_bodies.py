"""The response bodies on the wire, key for key and in order, and each one its pydantic model's dump.

The builders of serve.http.schemas produce them; the per-token ones write dicts directly, so ``conforms`` holds each
body equal to what its model (the one /openapi.json documents) makes of it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from serve.engine.types import FinishReason, TokenEvent
from serve.errors import GenerationFailed, NotReady, Unauthorized, ValidationFailed
from serve.errors import OpenAIError, TGIError
from pydantic import BaseModel

from serve.http.schemas import openai as oa
from serve.http.schemas import openai_responses as responses
from serve.http.schemas import tgi

CALL = {"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": '{"x": 1}'}}
USAGE = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 2}}


def same(body: Any, expected: Any) -> None:
    """Equal, with the keys in the same order (clients see the JSON text)."""
    assert json.dumps(body) == json.dumps(expected)


def conforms(model: type[BaseModel], body: dict[str, Any]) -> None:
    """``body`` is exactly its model's dump: nothing the model lacks, nothing it would add, null where it sends null."""
    same(model.model_validate(body).model_dump(), body)


def envelope(obj: str, choices: list) -> dict[str, Any]:
    return {
        "id": "x-1",
        "object": obj,
        "created": 0,
        "model": "m",
        "system_fingerprint": oa.SYSTEM_FINGERPRINT,
        "choices": choices,
    }


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    monkeypatch.setattr("time.time", lambda: 0.4)


def test_usage_counts_the_cached_prompt_tokens():
    same(oa.usage(3, 5, 2), USAGE)
    same(oa.usage(3, 5), {**USAGE, "prompt_tokens_details": {"cached_tokens": 0}})
    conforms(responses.Usage, oa.usage(3, 5, 2))


def test_chat_completion_with_a_text_and_a_tool_call_choice():
    entry = oa.logprob_entry("é", -0.5, [("é", -0.5), ("a", -1.25)])
    text = oa.chat_choice(0, {"role": "assistant", "content": "hi"}, "stop", {"content": [entry]})
    call = oa.chat_choice(1, {"role": "assistant", "content": None, "tool_calls": [CALL]}, "tool_calls", None)
    body = oa.chat_completion("x-1", "m", [text, call], oa.usage(3, 5, 2))
    expected_entry = {
        "token": "é",
        "logprob": -0.5,
        "bytes": [195, 169],
        "top_logprobs": [
            {"token": "é", "logprob": -0.5, "bytes": [195, 169]},
            {"token": "a", "logprob": -1.25, "bytes": [97]},
        ],
    }
    choices = [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi"},
            "logprobs": {"content": [expected_entry]},
            "finish_reason": "stop",
        },
        {
            "index": 1,
            "message": {"role": "assistant", "content": None, "tool_calls": [CALL]},
            "logprobs": None,
            "finish_reason": "tool_calls",
        },
    ]
    same(body, {**envelope("chat.completion", choices), "usage": USAGE})
    conforms(responses.ChatCompletion, body)
    conforms(responses.TokenLogprob, entry)


@pytest.mark.parametrize(
    "delta",
    [
        {"role": "assistant", "content": ""},
        {"content": "tok"},
        {"tool_calls": [{"index": 0, **CALL}]},
        {},
    ],
)
def test_chat_chunk_sends_the_delta_as_given(delta):
    choice = {"index": 2, "delta": delta, "logprobs": None, "finish_reason": None}
    same(oa.chat_chunk("x-1", "m", 2, delta), envelope("chat.completion.chunk", [choice]))
    conforms(responses.ChatCompletionChunk, oa.chat_chunk("x-1", "m", 2, delta))


def test_chat_chunk_with_a_finish_reason_and_logprobs():
    logprobs = {"content": [oa.logprob_entry("a", -0.1, [])]}
    body = oa.chat_chunk("x-1", "m", 0, {}, "length", logprobs)
    expected = {"content": [{"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}]}
    choice = {"index": 0, "delta": {}, "logprobs": expected, "finish_reason": "length"}
    same(body, envelope("chat.completion.chunk", [choice]))
    conforms(responses.ChatCompletionChunk, body)


def test_text_completion_with_and_without_usage():
    logprobs = oa.completion_logprobs(["a", "bc"], [None, -0.5], [None, {"bc": -0.5}], 3)
    choice = oa.text_choice(0, "abc", "stop", logprobs)
    expected_choice = {
        "index": 0,
        "text": "abc",
        "logprobs": {
            "tokens": ["a", "bc"],
            "token_logprobs": [None, -0.5],
            "top_logprobs": [None, {"bc": -0.5}],
            "text_offset": [3, 4],
        },
        "finish_reason": "stop",
    }
    same(
        oa.text_completion("x-1", "m", [choice], oa.usage(3, 5, 2)),
        {**envelope("text_completion", [expected_choice]), "usage": USAGE},
    )
    plain = oa.text_choice(1, "", None)
    expected_plain = {"index": 1, "text": "", "logprobs": None, "finish_reason": None}
    same(oa.text_completion("x-1", "m", [plain]), envelope("text_completion", [expected_plain]))
    conforms(responses.TextCompletion, oa.text_completion("x-1", "m", [choice], oa.usage(3, 5, 2)))
    conforms(responses.TextCompletion, oa.text_completion("x-1", "m", [plain]))


@pytest.mark.parametrize("obj", ["chat.completion.chunk", "text_completion"])
def test_usage_chunk_has_no_choices(obj):
    same(oa.usage_chunk("x-1", "m", obj, oa.usage(3, 5, 2)), {**envelope(obj, []), "usage": USAGE})
    conforms(responses.CHUNK_MODELS[obj], oa.usage_chunk("x-1", "m", obj, oa.usage(3, 5, 2)))


def final(reason: FinishReason = FinishReason.STOP, stop: str | None = None) -> TokenEvent:
    return TokenEvent(7, "x", reason, generated_tokens=4, prompt_tokens=9, stop_sequence=stop)


def test_tgi_tokens_carry_special_only_when_known():
    same(tgi.token(5, "a", -0.5, False), {"id": 5, "text": "a", "logprob": -0.5, "special": False})
    same(tgi.token(5, "a", None), {"id": 5, "text": "a", "logprob": None})
    conforms(tgi.Token, tgi.token(5, "a", -0.5, False))
    conforms(tgi.Token, tgi.token(5, "a", None))


def test_tgi_details_with_and_without_top_tokens():
    tokens = [tgi.token(5, "a", -0.5, False)]
    prefill = [tgi.token(1, "<s>", None)]
    base = {
        "finish_reason": "eos_token",
        "generated_tokens": 4,
        "seed": None,
        "input_length": 9,
        "prefill": prefill,
        "tokens": tokens,
    }
    same(tgi.details(final(), None, tokens, prefill, None), base)
    top = [[tgi.token(6, "b", -1.0, True)]]
    same(
        tgi.details(final(FinishReason.STOP, "\n"), 3, tokens, prefill, top),
        {**base, "finish_reason": "stop_sequence", "seed": 3, "top_tokens": top},
    )
    same(tgi.details(final(FinishReason.LENGTH), 3, [], [], None)["finish_reason"], "length")
    conforms(tgi.Details, tgi.details(final(FinishReason.STOP, "\n"), 3, tokens, prefill, top))


def test_tgi_stream_bodies():
    same(
        tgi.stream_details(final(FinishReason.LENGTH), 11),
        {"finish_reason": "length", "generated_tokens": 4, "seed": 11, "input_length": 9},
    )
    token = tgi.token(5, "a", -0.5, False)
    same(tgi.stream_token(1, token, None), {"index": 1, "token": token, "generated_text": None, "details": None})
    top = [tgi.token(6, "b", -1.0, True)]
    same(
        tgi.stream_token(2, token, top),
        {"index": 2, "token": token, "generated_text": None, "details": None, "top_tokens": top},
    )
    last = {**tgi.stream_token(2, token, top), "generated_text": "ab", "details": tgi.stream_details(final(), None)}
    conforms(tgi.StreamResponse, last)
    conforms(tgi.StreamResponse, tgi.stream_token(1, token, None))


def test_tgi_bodies_are_plain_dicts_the_routes_may_extend():
    body = tgi.stream_token(1, tgi.token(5, "a", -0.5, False), None)
    body["generated_text"] = "a"
    details = tgi.details(final(), None, [], [], None)
    details["best_of_sequences"] = []
    assert type(body) is dict and type(details) is dict
    details["best_of_sequences"] = [{"generated_text": "b", **tgi.details(final(), 4, [], [], None)}]
    conforms(tgi.GenerateResponse, {"generated_text": "a", "details": details})
    conforms(tgi.GenerateResponse, {"generated_text": "a"})


@pytest.mark.parametrize(
    ("error", "openai", "tgi_body"),
    [
        (
            ValidationFailed("max_tokens: too big", "max_tokens"),
            {
                "message": "max_tokens: too big",
                "type": "invalid_request_error",
                "param": "max_tokens",
                "code": "invalid_value",
            },
            {"error": "max_tokens: too big", "error_type": "validation"},
        ),
        (
            NotReady("loading"),
            {"message": "loading", "type": "unhealthy", "param": None, "code": 503},
            {"error": "loading", "error_type": "unhealthy"},
        ),
        (
            Unauthorized("no key"),
            {"message": "no key", "type": "authentication_error", "param": None, "code": 401},
            {"error": "no key", "error_type": "authentication_error"},
        ),
        (
            GenerationFailed("boom"),
            {"message": "boom", "type": "generation", "param": None, "code": 424},
            {"error": "boom", "error_type": "generation"},
        ),
    ],
)
def test_error_bodies_of_both_styles(error, openai, tgi_body):
    same(error.openai_body(), {"error": openai})
    same(error.tgi_body(), tgi_body)
    conforms(OpenAIError, error.openai_body())
    conforms(TGIError, error.tgi_body())
