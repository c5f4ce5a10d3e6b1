"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional

from flask import Blueprint, Response, jsonify

from serve.engine import TokenEvent
from serve.engine.types import FinishReason
from serve.front.context import Api, RequestContext
from serve.front.chat_output import (
    ChatOutputParser,
    OutputDelta,
    OutputFormat,
    event_text,
    marker_tokens,
    model_output_format,
    parse_text,
    prompt_tail,
)
from serve.front.generation import Choice, Generation, ValidRequest, timing_headers
from serve.http.routes import sse
from serve.http.routes.common import (
    admit,
    api_json_body,
    request_context,
    service,
    settings,
    stream_events,
    token_texts,
    validator,
)
from serve.http.routes.completions import completions, stream_end
from serve.http.schemas import openai as oa
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
    reading = ChatReading.of(valid)
    generation = admit(reading.constrained(valid), context.speaking(Api.CHAT, req.stream))
    completion_id = oa.new_id("chatcmpl")
    if req.stream:
        return sse.response(_chat_chunks(generation, req, completion_id, reading), generation.pending)
    choices = service().collect(generation)
    body = oa.chat_completion(
        completion_id, req.model, [_chat_choice(c, req, reading) for c in choices], _usage(choices)
    )
    return _json(body, choices[0].final)


@dataclass(frozen=True)
class ChatReading:
    """How this request's answers are read: the model's formats, the tools offered, whether the prompt opened the
    thoughts, and the special tokens that stand for the formats' markers."""

    form: OutputFormat
    tool_names: list[str]
    forced: bool
    opened: bool
    markers: dict[int, str]

    @classmethod
    def of(cls, valid: ValidRequest[oa.ChatCompletionRequest]) -> "ChatReading":
        req, tokenizer = valid.body, service().tokenizer
        form = model_output_format(tokenizer, settings())
        tools = req.forced_tools or req.active_tools
        opened = form.opens_thoughts(prompt_tail(tokenizer, valid.prompt_ids))
        markers = marker_tokens(tokenizer, form.markers)
        return cls(form, [tool.function.name for tool in tools], bool(req.forced_tools), opened, markers)

    def constrained(self, valid: ValidRequest[oa.ChatCompletionRequest]) -> ValidRequest:
        """``valid`` with its grammar (a forced call, a response format) applied only after a reasoning model's
        thoughts."""
        grammar = valid.params[0].grammar
        wrapped = self.form.constrain(grammar, self.opened)
        if wrapped == grammar:
            return valid
        service().check_grammar(wrapped, "tools" if self.forced else "response_format")
        return replace(valid, params=tuple(replace(params, grammar=wrapped) for params in valid.params))

    def parser(self) -> ChatOutputParser:
        return self.form.parser(self.tool_names, self.forced, self.opened)

    def text(self, choice: Choice) -> str:
        """The choice's text with the formats' special marker tokens in place."""
        if not self.markers:
            return choice.text
        tail = choice.final.text if choice.final.token_id is None else ""
        return "".join(event_text(event, self.markers) for event in choice.tokens) + tail


def _chat_choice(choice: Choice, req: oa.ChatCompletionRequest, reading: ChatReading) -> dict[str, Any]:
    truncated = choice.final.finish_reason is FinishReason.LENGTH
    answer = parse_text(reading.parser(), reading.text(choice), truncated)
    calls = [call.openai() for call in answer.tool_calls]
    message: dict[str, Any] = {"role": "assistant", "content": answer.content}
    if (calls or answer.reasoning) and not answer.content:
        message["content"] = None
    if answer.reasoning:
        message["reasoning_content"] = answer.reasoning
    if calls:
        message["tool_calls"] = calls
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


def _chat_chunks(
    generation: Generation, req: oa.ChatCompletionRequest, completion_id: str, reading: ChatReading
) -> Iterator[str]:
    """The stream: each choice's role chunk, then its thoughts, content and tool calls as they are read, and its
    finish reason; usage, [DONE]."""

    def chunk(index: int, delta: dict[str, Any], reason: Optional[str] = None, logprobs: Optional[dict] = None) -> str:
        return sse.event(oa.chat_chunk(completion_id, req.model, index, delta, reason, logprobs))

    parsers = [reading.parser() for _ in range(req.n)]
    calls_sent = [0] * req.n

    def render(index: int, event: TokenEvent) -> Iterator[str]:
        delta = parsers[index].feed(event_text(event, reading.markers))
        logprobs = _chat_logprobs([event]) if req.logprobs and event.token_id is not None else None
        yield from _delta_chunks(chunk, index, delta, calls_sent, logprobs)
        if event.finish_reason is not None:
            truncated = event.finish_reason is FinishReason.LENGTH
            yield from _delta_chunks(chunk, index, parsers[index].finish(truncated), calls_sent)
            yield chunk(index, {}, oa.openai_finish_reason(event.finish_reason, calls_sent[index] > 0))

    for index in range(req.n):
        yield chunk(index, {"role": "assistant", "content": ""})
    end = stream_end(req, completion_id, "chat.completion.chunk", lambda finals: _usage_of(list(finals.values())))
    yield from sse.stream(stream_events(generation), render, generation.context.api.error_style, end)


def _delta_chunks(
    chunk: Any, index: int, delta: OutputDelta, calls_sent: list[int], logprobs: Optional[dict] = None
) -> Iterator[str]:
    """One parsed delta as chunks: thoughts, then content (with the token's log-probabilities), then each call as
    OpenAI's incremental ``tool_calls`` deltas (id and name first, then the arguments)."""
    if delta.reasoning:
        yield chunk(index, {"reasoning_content": delta.reasoning})
    if delta.content or logprobs:
        yield chunk(index, {"content": delta.content}, logprobs=logprobs)
    for call in delta.tool_calls:
        for call_delta in call.stream_deltas(calls_sent[index]):
            yield chunk(index, {"tool_calls": [call_delta]})
        calls_sent[index] += 1
