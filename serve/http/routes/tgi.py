"""TGI-compatible routes: /generate, /generate_stream, /info, /health, /tokenize."""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Optional

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

from serve.engine import TokenEvent
from serve.front.context import Api, RequestContext
from serve.front.generation import Choice, Generation, timing_headers
from serve.errors import NotReady
from serve.http.info import info_body
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
from serve.http.routes.parsing import validate
from serve.http.schemas import tgi
from serve.http.routes.adapter_choice import loaded_adapters

blueprint = Blueprint("tgi", __name__)


@blueprint.post("/generate")
def generate_route() -> Response:
    return generate(api_json_body(), request_context(), as_list=False)


@blueprint.post("/")
def compat_route() -> Response:
    """TGI's root route (what TGI's clients post to): /generate's body wrapped in a list as TGI does, or a stream."""
    return generate(api_json_body(), request_context(), as_list=True)


@blueprint.post("/generate_stream")
def generate_stream_route() -> Response:
    payload = api_json_body()
    payload["stream"] = True
    return generate(payload, request_context(), as_list=False)


@blueprint.get("/health")
def health() -> Response:
    if not service().engine.ready:
        raise NotReady("the model is not ready")
    return Response(status=200)


@blueprint.get("/info")
def info() -> Response:
    return jsonify(info_body(service().engine, settings(), loaded_adapters()))


@blueprint.get("/metrics")
def metrics() -> Response:
    return Response(service().metrics.render(), mimetype=CONTENT_TYPE_LATEST)


@blueprint.post("/tokenize")
def tokenize() -> Response:
    req = validate(tgi.TokenizeRequest, api_json_body())
    encoding = service().tokenize(req.inputs)
    tokens = [
        {"id": token_id, "text": req.inputs[start:stop], "start": start, "stop": stop}
        for token_id, (start, stop) in zip(encoding["input_ids"], encoding["offset_mapping"])
    ]
    return jsonify(tokens)


def generate(payload: dict[str, Any], context: RequestContext, as_list: bool) -> Response:
    """Serve one TGI generate request; ``as_list`` wraps the body in a list, as TGI's /invocations does."""
    valid = validator().generate(payload)
    req, prompt_ids = valid.body, valid.prompt_ids
    generation = admit(valid, context.speaking(Api.TGI, req.stream))
    if req.stream:
        return sse.response(_token_events(generation, req), generation.pending)
    choices = service().collect(generation)
    best = max(choices, key=lambda c: sum(event.logprob or 0.0 for event in c.tokens))
    body: dict[str, Any] = {"generated_text": _full_text(req, best.text)}
    if req.parameters.details:
        body["details"] = _details(req, best, prompt_ids)
        if len(choices) > 1:
            body["details"]["best_of_sequences"] = [
                {"generated_text": _full_text(req, c.text), **_details(req, c, prompt_ids)}
                for c in choices
                if c is not best
            ]
    response = jsonify([body] if as_list else body)
    response.headers.update(timing_headers(best.final))
    return response


def _full_text(req: tgi.GenerateRequest, text: str) -> str:
    return req.inputs + text if req.parameters.return_full_text else text


def _details(req: tgi.GenerateRequest, choice: Choice, prompt_ids: list[int]) -> dict[str, Any]:
    """TGI's details of one choice: finish reason, generated tokens with log-probabilities, prefill, top tokens."""
    tokens = _tokens(choice.tokens)
    top = [_top_tokens(event) for event in choice.tokens] if req.parameters.top_n_tokens else None
    prefill = (
        _prefill(prompt_ids, choice.tokens[0].prompt_logprobs)
        if choice.tokens and req.parameters.decoder_input_details
        else []
    )
    return tgi.details(choice.final, choice.seed, tokens, prefill, top)


def _tokens(events: list[TokenEvent]) -> list[dict[str, Any]]:
    special = set(service().tokenizer.all_special_ids)
    texts = token_texts([event.token_id for event in events])
    return [
        tgi.token(event.token_id, text, event.logprob, event.token_id in special) for event, text in zip(events, texts)
    ]


def _top_tokens(event: TokenEvent) -> list[dict[str, Any]]:
    special = set(service().tokenizer.all_special_ids)
    texts = token_texts([token_id for token_id, _ in event.top_logprobs])
    return [
        tgi.token(token_id, text, logprob, token_id in special)
        for (token_id, logprob), text in zip(event.top_logprobs, texts)
    ]


def _prefill(prompt_ids: list[int], logprobs: Optional[tuple]) -> list[dict[str, Any]]:
    texts = token_texts(prompt_ids)
    scores = list(logprobs or ()) + [None] * len(prompt_ids)
    return [tgi.token(token_id, text, score) for token_id, text, score in zip(prompt_ids, texts, scores)]


def _token_events(generation: Generation, req: tgi.GenerateRequest) -> Iterator[str]:
    """The stream: one event per generated token, the last with the whole text (and details when asked for)."""
    pieces: list[str] = [req.inputs] if req.parameters.return_full_text else []
    numbers = itertools.count(1)

    def render(_index: int, event: TokenEvent) -> list[str]:
        if event.token_id is None:
            return []
        pieces.append(event.text)
        return [sse.event(_stream_token(req, next(numbers), event, pieces))]

    return sse.stream(stream_events(generation), render, generation.context.api.error_style)


def _stream_token(req: tgi.GenerateRequest, number: int, event: TokenEvent, pieces: list[str]) -> dict[str, Any]:
    """One streamed token's body; the last one also carries the generated text and the details."""
    token_body = dict(_tokens([event])[0], text=event.text)
    body = tgi.stream_token(number, token_body, _top_tokens(event) if req.parameters.top_n_tokens else None)
    if event.finish_reason is not None:
        body["generated_text"] = "".join(pieces)
        body["details"] = tgi.stream_details(event, req.seed) if req.parameters.details else None
    return body
