"""The OpenAPI 3.1 document, assembled at run time from the app's routes and the pydantic models of serve.http.schemas.

Request bodies and responses come from the model classes the routes validate requests with and build bodies from,
so a field added to a model is documented without touching this module; every route of the app is listed, a route
this module has no details for with a generic entry. Errors are documented in the style serve.errors.error_style
picks for the path (and, inside a stream, for the stream's API).
"""

from __future__ import annotations

import re
from typing import Any, Optional, Union

from flask import Flask
from pydantic import BaseModel, TypeAdapter

import serve
from serve.errors import ErrorStyle, error_style
from serve.http.schemas import openai as oa
from serve.http.schemas import responses_api_output as rsp
from serve.http.schemas import tgi
from serve.errors import OpenAIError, TGIError
from serve.http.schemas.responses_api import ResponsesRequest
from serve.http.schemas.sagemaker import RegisterAdapter, Status
from serve.http.security import OPEN_PATHS

REF = "#/components/schemas/{model}"
ERROR_STATUSES = {
    "400": "The body is not JSON, or not a JSON object",
    "401": "API_KEY is set and the Bearer token is missing or wrong",
    "413": "The body is larger than the payload limit",
    "422": "A field is missing, has the wrong type or is out of range; the message names it (400 on /v1/*, as OpenAI)",
    "424": "The model failed while generating",
    "429": "MAX_CONCURRENT_REQUESTS are in flight; retry later",
    "503": "The model is loading, or the server is shutting down",
}
SSE = "text/event-stream"
ERROR_MODELS: dict[ErrorStyle, type[BaseModel]] = {ErrorStyle.OPENAI: OpenAIError, ErrorStyle.TGI: TGIError}

INVOCATION = Union[
    oa.ChatCompletionRequest, oa.CompletionRequest, tgi.GenerateRequest, ResponsesRequest
]  # told apart by messages/prompt/inputs (input: the Responses API, with MESSAGES_API_ENABLED)

# the streams a route may answer with: what each event's data carries, and the style of the stream's errors
CHAT_STREAM = (oa.ChatCompletionChunk, ErrorStyle.OPENAI)
COMPLETION_STREAM = (oa.TextCompletion, ErrorStyle.OPENAI)
TGI_STREAM = (tgi.StreamResponse, ErrorStyle.TGI)
RESPONSES_STREAM = (rsp.ResponseStreamEvent, ErrorStyle.OPENAI)  # named events; a failure is response.failed
STREAMS: dict[str, tuple[tuple[type[BaseModel], ErrorStyle], ...]] = {
    "/invocations": (CHAT_STREAM, COMPLETION_STREAM, TGI_STREAM, RESPONSES_STREAM),
    "/v1/chat/completions": (CHAT_STREAM,),
    "/v1/completions": (COMPLETION_STREAM,),
    "/v1/responses": (RESPONSES_STREAM,),
    "/generate": (TGI_STREAM,),
    "/": (TGI_STREAM,),
    "/generate_stream": (TGI_STREAM,),
}

# (method, path) -> summary, request model, 200 response: (model or None, media types)
OPERATIONS: dict[tuple[str, str], tuple[str, Optional[type], Any, tuple[str, ...]]] = {
    ("GET", "/ping"): ("SageMaker health check: 200 once the model is loaded", None, Status, ("application/json",)),
    ("POST", "/invocations"): (
        "SageMaker inference: chat (messages), completion (prompt) or TGI (inputs)",
        INVOCATION,
        Union[oa.ChatCompletion, oa.TextCompletion, list[tgi.GenerateResponse], rsp.ResponseObject],
        ("application/json", SSE),
    ),
    ("POST", "/v1/chat/completions"): (
        "OpenAI chat completion",
        oa.ChatCompletionRequest,
        oa.ChatCompletion,
        ("application/json", SSE),
    ),
    ("POST", "/v1/completions"): (
        "OpenAI text completion",
        oa.CompletionRequest,
        oa.TextCompletion,
        ("application/json", SSE),
    ),
    ("POST", "/v1/responses"): (
        "OpenAI Responses API, stateless: input items, instructions, function tools, text.format, streamed events",
        ResponsesRequest,
        rsp.ResponseObject,
        ("application/json", SSE),
    ),
    ("GET", "/v1/models"): ("The served model", None, oa.ModelList, ("application/json",)),
    ("POST", "/generate"): (
        "TGI generate (SSE when the body sets stream: true)",
        tgi.GenerateRequest,
        tgi.GenerateResponse,
        ("application/json", SSE),
    ),
    ("POST", "/"): (
        "TGI's root route (TGI's clients): /generate's answer as a one-item list, or a stream",
        tgi.GenerateRequest,
        list[tgi.GenerateResponse],
        ("application/json", SSE),
    ),
    ("POST", "/generate_stream"): ("TGI generate, streamed as Server-Sent Events", tgi.GenerateRequest, None, (SSE,)),
    ("POST", "/tokenize"): (
        "TGI tokenize: token ids with their text spans",
        tgi.TokenizeRequest,
        list[tgi.TokenSpan],
        ("application/json",),
    ),
    ("GET", "/info"): ("TGI info: model and limits", None, tgi.Info, ("application/json",)),
    ("GET", "/health"): ("TGI health: 200 once ready", None, None, ()),
    ("GET", "/metrics"): ("Prometheus metrics", None, None, ("text/plain",)),
    ("GET", "/openapi.json"): ("This document", None, None, ("application/json",)),
    ("GET", "/docs"): ("This document as an HTML page", None, None, ("text/html",)),
    ("POST", "/adapters"): (
        "Register a LoRA adapter (JSON body or query parameters)",
        RegisterAdapter,
        None,
        ("text/plain",),
    ),
    ("DELETE", "/adapters/{name}"): (
        "Unregister a LoRA adapter once its running requests finish",
        None,
        None,
        ("text/plain",),
    ),
}
EXTRA_ERRORS = {  # statuses beyond ERROR_STATUSES that an operation answers
    ("POST", "/adapters"): {"409": "The name is registered from another src (or is being registered or deleted)"},
    ("DELETE", "/adapters/{name}"): {"404": "No adapter of that name is registered"},
}


def build_openapi(app: Flask, api_key_required: bool) -> dict[str, Any]:
    """The OpenAPI document for every route of ``app`` (HEAD/OPTIONS and static files excluded)."""
    components: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)  # Flask's <name> is OpenAPI's {name}
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            view = app.view_functions[rule.endpoint]
            operation = _operation(method, path, view.__doc__, components)
            if rule.arguments:
                operation["parameters"] = [
                    {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                    for name in sorted(rule.arguments)
                ]
            if api_key_required and rule.rule not in OPEN_PATHS:
                operation["security"] = [{"bearer": []}]
            paths.setdefault(path, {})[method.lower()] = operation
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "sagemaker-llm-serve",
            "version": serve.__version__,
            "description": "SageMaker, OpenAI and TGI APIs over one continuous-batching engine.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }
    if api_key_required:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    return document


def _schema(kind: Any, components: dict[str, Any], mode: str) -> dict[str, Any]:
    """A JSON schema for ``kind``; named models go to ``components`` and are referenced."""
    schema = TypeAdapter(kind).json_schema(ref_template=REF, mode=mode)
    named = schema.pop("$defs", {})
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        named[kind.__name__] = schema
        schema = {"$ref": REF.format(model=kind.__name__)}
    for name, definition in named.items():
        if components.setdefault(name, definition) != definition:  # two models of one name, or one of two modes
            raise ValueError(f"two different schemas are named {name}")
    return schema


def _operation(method: str, path: str, doc: Optional[str], components: dict[str, Any]) -> dict[str, Any]:
    """One operation: summary, request body from the request model, the 200 response and the error responses."""
    fallback = ((doc or f"{method} {path}").strip().splitlines()[0], None, None, ("application/json",))
    summary, request_model, response, media = OPERATIONS.get((method, path), fallback)
    operation_id = method.lower() + re.sub(r"[/.]", "_", re.sub(r"[{}]", "", path))
    operation: dict[str, Any] = {"summary": summary, "operationId": operation_id}
    if request_model is not None:
        body = _schema(request_model, components, "validation")
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    operation["responses"] = {
        "200": _ok(path, response, media, components),
        **_errors(path, request_model is not None, components),
    }
    for code, text in EXTRA_ERRORS.get((method, path), {}).items():
        operation["responses"][code] = {**operation["responses"]["401"], "description": text}
    return operation


def _ok(path: str, response: Any, media: tuple[str, ...], components: dict[str, Any]) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "OK"}
    content: dict[str, Any] = {}
    for kind in media:
        if kind == SSE:
            content[kind] = {"schema": _sse_event(path, components)}
        elif kind == "application/json":
            content[kind] = {"schema": _schema(response, components, "serialization") if response is not None else {}}
        else:
            content[kind] = {"schema": {"type": "string"}}
    if content:
        ok["content"] = content
    return ok


def _sse_event(path: str, components: dict[str, Any]) -> dict[str, Any]:
    """One Server-Sent Event of ``path``'s stream: a JSON chunk, the closing ``[DONE]``, or an ``error`` event."""
    streams = STREAMS.get(path, ())
    data = {}
    if streams:
        chunk = _schema(_one_of(kind for kind, _ in streams), components, "serialization")
        data = {"contentMediaType": "application/json", "contentSchema": chunk}
    styles = [error_style(path, style) for _, style in streams] or [error_style(path)]
    error = _schema(_one_of(ERROR_MODELS[style] for style in styles), components, "serialization")
    message = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"const": "message"},
            "data": {"anyOf": [{"const": "[DONE]"}, {"type": "string", **data}]},
        },
    }
    failure = {
        "type": "object",
        "required": ["data", "event"],
        "properties": {
            "event": {"const": "error"},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": error},
        },
    }
    return {"oneOf": [message, failure]}


def _one_of(kinds: Any) -> Any:
    """The union of ``kinds`` (repeats dropped), or the one kind."""
    unique = tuple(dict.fromkeys(kinds))
    return unique[0] if len(unique) == 1 else Union[unique]


def _errors(path: str, has_body: bool, components: dict[str, Any]) -> dict[str, Any]:
    """The error responses of a route, in the style serve.errors.error_style picks for its path."""
    style = error_style(path)
    ref = _schema(ERROR_MODELS[style], components, "serialization")
    statuses = ERROR_STATUSES if has_body else {code: ERROR_STATUSES[code] for code in ("401", "503")}
    if style is ErrorStyle.OPENAI and has_body:  # OpenAI answers every invalid request with 400
        statuses = {code: text for code, text in statuses.items() if code != "422"}
        statuses["400"] = "The body is not JSON, or a field is missing, of the wrong type or out of range (see param)"
    errors = {
        code: {"description": text, "content": {"application/json": {"schema": ref}}} for code, text in statuses.items()
    }
    if path == "/ping":
        errors = {
            "503": {
                "description": "Loading, restarting after an engine crash, stalled, failed, or draining",
                "content": {"application/json": {"schema": _schema(Status, components, "serialization")}},
            }
        }
    return errors
