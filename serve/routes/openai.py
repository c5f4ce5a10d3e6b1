"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

from typing import Any, Iterator

from flask import Blueprint, Response, jsonify

from serve.engine import RequestStream, TokenEvent
from serve.errors import GenerationFailed
from serve.routes import sse
from serve.routes.common import json_body, service, validate
from serve.schemas import openai as oa
from serve.generation import timing_headers

blueprint = Blueprint("openai", __name__)


@blueprint.post("/v1/chat/completions")
def chat_completions_route() -> Response:
    return chat_completions(json_body(), route="/v1/chat/completions")


@blueprint.post("/v1/completions")
def completions_route() -> Response:
    return completions(json_body(), route="/v1/completions")


@blueprint.get("/v1/models")
def models() -> Response:
    name = service().engine.loaded.name if service().engine.ready else "loading"
    return jsonify({"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "local"}]})


def chat_completions(payload: dict[str, Any], route: str) -> Response:
    """Serve one chat completion request (also reached from /invocations)."""
    req = validate(oa.ChatCompletionRequest, payload)
    prompt_ids = service().chat_prompt(m.as_template_dict() for m in req.messages)
    stream = service().start(prompt_ids, req.requested_max_tokens, req.to_sampling_params, "messages")
    completion_id = oa.new_id("chatcmpl")
    if req.stream:
        return sse.response(_chat_chunks(stream, req, completion_id, route))
    done = service().collect(stream, route)
    body = oa.chat_completion(completion_id, req.model, done.text, done.final.finish_reason, done.final.prompt_tokens, done.final.generated_tokens)
    return _json(body, done.final)


def completions(payload: dict[str, Any], route: str) -> Response:
    """Serve one text completion request (also reached from /invocations)."""
    req = validate(oa.CompletionRequest, payload)
    prompt_ids = service().text_prompt(req.prompt_text)
    stream = service().start(prompt_ids, req.requested_max_tokens, req.to_sampling_params, "prompt")
    completion_id = oa.new_id("cmpl")
    prefix = req.prompt_text if req.echo else ""
    if req.stream:
        return sse.response(_completion_chunks(stream, req, completion_id, route, prefix))
    done = service().collect(stream, route)
    usage = oa.usage(done.final.prompt_tokens, done.final.generated_tokens)
    return _json(oa.text_completion(completion_id, req.model, prefix + done.text, done.final.finish_reason, usage), done.final)


def _json(body: dict[str, Any], final: TokenEvent) -> Response:
    response = jsonify(body)
    response.headers.update(timing_headers(final))
    return response


def _chat_chunks(stream: RequestStream, req: oa.ChatCompletionRequest, completion_id: str, route: str) -> Iterator[str]:
    yield sse.event(oa.chat_chunk(completion_id, req.model, {"role": "assistant", "content": ""}))
    try:
        for event in service().stream_events(stream, route, sse.KEEPALIVE_SECONDS):
            if event is None:
                yield sse.KEEPALIVE
                continue
            if event.text:
                yield sse.event(oa.chat_chunk(completion_id, req.model, {"content": event.text}))
            if event.finish_reason is not None:
                yield sse.event(oa.chat_chunk(completion_id, req.model, {}, event.finish_reason))
                if req.include_usage:
                    yield sse.event(oa.usage_chunk(completion_id, req.model, "chat.completion.chunk", event.prompt_tokens, event.generated_tokens))
        yield sse.DONE
    except GenerationFailed as exc:
        yield sse.event(exc.openai_body(), name="error")


def _completion_chunks(stream: RequestStream, req: oa.CompletionRequest, completion_id: str, route: str, prefix: str) -> Iterator[str]:
    if prefix:
        yield sse.event(oa.text_completion(completion_id, req.model, prefix, None))
    try:
        for event in service().stream_events(stream, route, sse.KEEPALIVE_SECONDS):
            if event is None:
                yield sse.KEEPALIVE
                continue
            if event.text or event.finish_reason is not None:
                yield sse.event(oa.text_completion(completion_id, req.model, event.text, event.finish_reason))
            if event.finish_reason is not None and req.include_usage:
                yield sse.event(oa.usage_chunk(completion_id, req.model, "text_completion", event.prompt_tokens, event.generated_tokens))
        yield sse.DONE
    except GenerationFailed as exc:
        yield sse.event(exc.openai_body(), name="error")
