"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

from typing import Any, Iterator, Optional

from flask import Blueprint, Response, jsonify

from serve.engine import TokenEvent
from serve.engine.types import FinishReason
from serve.front.context import Api, RequestContext
from serve.front.generation import Choice, Generation, timing_headers
from serve.http.routes import sse
from serve.http.routes.common import (
    admit,
    api_json_body,
    request_context,
    service,
    stream_events,
    token_texts,
    validator,
)
from serve.http.routes.completions import completions, stream_end
from serve.http.schemas import openai as oa
from serve.http.schemas.tools import ToolCallBuffer, parse_tool_calls, truncated_tool_call
from serve.http.routes.adapter_choice import loaded_adapters

blueprint = Blueprint("openai", __name__)


@blueprint.post("/v1/chat/completions")
def chat_completions_route() -> Response:
    return chat_completions(api_json_body(), request_context())


@blueprint.post("/v1/completions")
def completions_route() -> Response:
    return completions(api_json_body(), request_context())


@blueprint.get("/v1/models")
def models() -> Response:
    name = service().engine.loaded.name if service().engine.ready else "loading"
    adapters = [
        {"id": adapter, "object": "model", "created": 0, "owned_by": "local", "parent": name}
        for adapter in loaded_adapters()
    ]
    return jsonify(
        {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "local"}] + adapters}
    )


def chat_completions(payload: dict[str, Any], context: RequestContext) -> Response:
    """Serve one chat completion request (also reached from /invocations)."""
    valid = validator().chat(payload)
    req = valid.body
    generation = admit(valid, context.speaking(Api.CHAT, req.stream))
    completion_id = oa.new_id("chatcmpl")
    if req.stream:
        return sse.response(_chat_chunks(generation, req, completion_id), generation.pending)
    choices = service().collect(generation)
    body = oa.chat_completion(completion_id, req.model, [_chat_choice(c, req) for c in choices], _usage(choices))
    return _json(body, choices[0].final)


def _chat_choice(choice: Choice, req: oa.ChatCompletionRequest) -> dict[str, Any]:
    calls = parse_tool_calls(choice.text, req.active_tools) if req.active_tools else None
    if calls is None and req.forced_tools and choice.final.finish_reason is FinishReason.LENGTH:
        calls = truncated_tool_call(choice.text, req.forced_tools)  # cut by max_tokens: partial arguments, as OpenAI
    message = (
        {"role": "assistant", "content": None, "tool_calls": calls}
        if calls
        else {"role": "assistant", "content": choice.text}
    )
    logprobs = _chat_logprobs(choice.tokens) if req.logprobs else None
    return oa.chat_choice(
        choice.index, message, oa.openai_finish_reason(choice.final.finish_reason, bool(calls)), logprobs
    )


def _chat_logprobs(events: list[TokenEvent]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object for these token events."""
    texts = token_texts([event.token_id for event in events])
    entries = []
    for text, event in zip(texts, events):
        top_texts = token_texts([token_id for token_id, _ in event.top_logprobs])
        entries.append(
            oa.logprob_entry(text, event.logprob, [(t, lp) for t, (_, lp) in zip(top_texts, event.top_logprobs)])
        )
    return {"content": entries}


def _usage(choices: list[Choice]) -> dict[str, int]:
    """Usage of all choices: the prompt counted once, every choice's tokens."""
    return _usage_of([choice.final for choice in choices])


def _usage_of(finals: list[TokenEvent]) -> dict[str, Any]:
    """Usage of the n choices of one request: one prompt (and its cached part), every choice's tokens."""
    return oa.usage(finals[0].prompt_tokens, sum(f.generated_tokens for f in finals), finals[0].cached_tokens)


def _json(body: dict[str, Any], final: TokenEvent) -> Response:
    response = jsonify(body)
    response.headers.update(timing_headers(final))
    return response


def _chat_chunks(generation: Generation, req: oa.ChatCompletionRequest, completion_id: str) -> Iterator[str]:
    """The stream: each choice's role chunk, then its content (or tool calls) and finish reason; usage, [DONE]."""

    def chunk(index: int, delta: dict[str, Any], reason: Optional[str] = None, logprobs: Optional[dict] = None) -> str:
        return sse.event(oa.chat_chunk(completion_id, req.model, index, delta, reason, logprobs))

    tools, forced = req.forced_tools or req.active_tools, bool(req.forced_tools)
    buffers = [ToolCallBuffer(tools, forced) if req.active_tools else None for _ in range(req.n)]

    def render(index: int, event: TokenEvent) -> Iterator[str]:
        buffer = buffers[index]
        text = buffer.feed(event.text) if buffer else event.text
        logprobs = _chat_logprobs([event]) if req.logprobs and event.token_id is not None else None
        if text or logprobs:
            yield chunk(index, {"content": text}, logprobs=logprobs)
        if event.finish_reason is not None:
            yield from _chat_ending(chunk, index, event, buffer)

    for index in range(req.n):
        yield chunk(index, {"role": "assistant", "content": ""})
    end = stream_end(req, completion_id, "chat.completion.chunk", lambda finals: _usage_of(list(finals.values())))
    yield from sse.stream(stream_events(generation), render, generation.context.api.error_style, end)


def _chat_ending(chunk: Any, index: int, final: TokenEvent, buffer: Optional[ToolCallBuffer]) -> Iterator[str]:
    """The last chunks of one streamed choice: held-back content or tool calls, then the finish reason."""
    calls = None
    if buffer is not None:
        rest, calls = buffer.finish(truncated=final.finish_reason is FinishReason.LENGTH)
        if calls:
            yield chunk(index, {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
        elif rest:
            yield chunk(index, {"content": rest})
    yield chunk(index, {}, oa.openai_finish_reason(final.finish_reason, bool(calls)))
