"""TGI-compatible routes: /generate, /generate_stream, /info, /health, /tokenize."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Iterator

from flask import Blueprint, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST

import serve
from serve.engine import RequestStream
from serve.errors import GenerationFailed, NotReady
from serve.generation import timing_headers
from serve.routes import sse
from serve.routes.common import json_body, service, settings, validate
from serve.schemas import tgi

blueprint = Blueprint("tgi", __name__)


@blueprint.post("/generate")
def generate_route() -> Response:
    return generate(json_body(), route="/generate", as_list=False)


@blueprint.post("/generate_stream")
def generate_stream_route() -> Response:
    payload = json_body()
    payload["stream"] = True
    return generate(payload, route="/generate_stream", as_list=False)


@blueprint.get("/health")
def health() -> Response:
    if not service().engine.ready:
        raise NotReady("the model is not ready")
    return Response(status=200)


@blueprint.get("/info")
def info() -> Response:
    engine = service().engine
    loaded: dict[str, Any] = {}
    if engine.ready:
        loaded = {
            "model_id": engine.loaded.name,
            "model_dtype": str(engine.loaded.dtype).replace("torch.", ""),
            "model_device_type": engine.loaded.device.type,
            **asdict(engine.limits),
        }
    body: dict[str, Any] = {
        "model_id": None,
        **loaded,
        "max_concurrent_requests": settings().max_concurrent_requests,
        "max_batch_prefill_tokens": engine.config.max_batch_prefill_tokens,
        "messages_api_enabled": settings().messages_api_enabled,
        "router": "sagemaker-llm-serve",
        "version": serve.__version__,
    }
    return jsonify(body)


@blueprint.get("/metrics")
def metrics() -> Response:
    return Response(service().metrics.render(), mimetype=CONTENT_TYPE_LATEST)


@blueprint.post("/tokenize")
def tokenize() -> Response:
    req = validate(tgi.TokenizeRequest, json_body())
    encoding = service().tokenizer(req.inputs, add_special_tokens=True, return_offsets_mapping=True)
    tokens = [
        {"id": token_id, "text": req.inputs[start:stop], "start": start, "stop": stop}
        for token_id, (start, stop) in zip(encoding["input_ids"], encoding["offset_mapping"])
    ]
    return jsonify(tokens)


def generate(payload: dict[str, Any], route: str, as_list: bool) -> Response:
    """Serve one TGI generate request; ``as_list`` wraps the body in a list, as TGI's /invocations does."""
    req = validate(tgi.GenerateRequest, payload)
    prompt_ids = service().text_prompt(req.inputs, truncate=req.parameters.truncate)
    stream = service().start(prompt_ids, req.requested_max_tokens, req.to_sampling_params, "inputs")
    if req.stream:
        return sse.response(_token_events(stream, req, route))
    done = service().collect(stream, route)
    text = (req.inputs + done.text) if req.parameters.return_full_text else done.text
    body: dict[str, Any] = {"generated_text": text}
    if req.parameters.details:
        body["details"] = tgi.details(done.final, req.parameters.seed)
    response = jsonify([body] if as_list else body)
    response.headers.update(timing_headers(done.final))
    return response


def _token_events(stream: RequestStream, req: tgi.GenerateRequest, route: str) -> Iterator[str]:
    special_ids = set(service().tokenizer.all_special_ids)
    pieces: list[str] = [req.inputs] if req.parameters.return_full_text else []
    index = 0
    try:
        for event in service().stream_events(stream, route, sse.KEEPALIVE_SECONDS):
            if event is None:
                yield sse.KEEPALIVE
                continue
            if event.token_id is None:
                continue
            index += 1
            pieces.append(event.text)
            body = tgi.stream_token(index, event, event.token_id in special_ids)
            if event.finish_reason is not None:
                body["generated_text"] = "".join(pieces)
                body["details"] = tgi.details(event, req.parameters.seed) if req.parameters.details else None
            yield sse.event(body)
    except GenerationFailed as exc:
        yield sse.event(exc.tgi_body(), name="error")
