"""The OpenAPI 3.1 document, assembled at run time from the app's routes and the pydantic request models.

Request bodies come from the request models' ``model_json_schema()``, so a field added to a model is documented
without touching this module; every route of the app is listed, a route this module has no details for with a
generic entry. Responses are described by the small models below (extra fields allowed, as bodies grow).
"""

from __future__ import annotations

import re
from typing import Any, Optional, Union

from flask import Flask
from pydantic import BaseModel, ConfigDict, TypeAdapter

import serve
from serve.security import OPEN_PATHS
from serve.schemas import openai as oa
from serve.schemas import tgi

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


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(_Open):
    role: str
    content: Optional[str] = None


class ChatChoice(_Open):
    index: int
    message: ChatMessageOut
    finish_reason: Optional[str] = None


class ChatCompletion(_Open):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(_Open):
    index: int
    text: str
    finish_reason: Optional[str] = None


class TextCompletion(_Open):
    id: str
    object: str
    created: int
    model: str
    choices: list[TextChoice]
    usage: Optional[Usage] = None


class ChunkChoice(_Open):
    index: int
    delta: dict[str, Any]
    finish_reason: Optional[str] = None


class ChatCompletionChunk(_Open):
    """One chunk of a chat stream; the last one has no choices and the usage (stream_options.include_usage)."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Optional[Usage] = None


class StreamedToken(_Open):
    id: int
    text: str
    special: bool


class StreamToken(_Open):
    """One /generate_stream event; the last one carries the whole generated_text."""

    index: int
    token: StreamedToken
    generated_text: Optional[str] = None
    details: Optional[dict[str, Any]] = None


class GenerateResponse(_Open):
    generated_text: str
    details: Optional[dict[str, Any]] = None


class TokenSpan(_Open):
    id: int
    text: str
    start: int
    stop: int


class ModelCard(_Open):
    id: str
    object: str


class ModelList(_Open):
    object: str
    data: list[ModelCard]


class Status(_Open):
    status: str


class Info(_Open):
    model_id: Optional[str] = None
    max_concurrent_requests: int
    version: str


class OpenAIErrorDetail(_Open):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Union[int, str]] = None


class OpenAIError(_Open):
    error: OpenAIErrorDetail


class TGIError(_Open):
    error: str
    error_type: str


class RegisterAdapter(BaseModel):
    """SageMaker's register-adapter request (the same fields may come as query parameters)."""

    name: str
    src: str  # a peft folder, a .tar.gz of one, or a folder holding one .tar.gz
    preload: bool = True
    pin: bool = False


INVOCATION = Union[
    oa.ChatCompletionRequest, oa.CompletionRequest, tgi.GenerateRequest
]  # told apart by messages/prompt/inputs

# what each event of a route's SSE stream carries in its data (besides the closing [DONE] and an error event)
STREAM_CHUNKS: dict[str, Any] = {
    "/invocations": Union[ChatCompletionChunk, TextCompletion, StreamToken],
    "/v1/chat/completions": ChatCompletionChunk,
    "/v1/completions": TextCompletion,
    "/generate": StreamToken,
    "/": StreamToken,
    "/generate_stream": StreamToken,
}

# (method, path) -> summary, request model, 200 response: (model or None, media types)
OPERATIONS: dict[tuple[str, str], tuple[str, Optional[type], Any, tuple[str, ...]]] = {
    ("GET", "/ping"): ("SageMaker health check: 200 once the model is loaded", None, Status, ("application/json",)),
    ("POST", "/invocations"): (
        "SageMaker inference: chat (messages), completion (prompt) or TGI (inputs)",
        INVOCATION,
        Union[ChatCompletion, TextCompletion, list[GenerateResponse]],
        ("application/json", SSE),
    ),
    ("POST", "/v1/chat/completions"): (
        "OpenAI chat completion",
        oa.ChatCompletionRequest,
        ChatCompletion,
        ("application/json", SSE),
    ),
    ("POST", "/v1/completions"): (
        "OpenAI text completion",
        oa.CompletionRequest,
        TextCompletion,
        ("application/json", SSE),
    ),
    ("GET", "/v1/models"): ("The served model", None, ModelList, ("application/json",)),
    ("POST", "/generate"): (
        "TGI generate (SSE when the body sets stream: true)",
        tgi.GenerateRequest,
        GenerateResponse,
        ("application/json", SSE),
    ),
    ("POST", "/"): (
        "TGI's root route (TGI's clients): /generate's answer as a one-item list, or a stream",
        tgi.GenerateRequest,
        list[GenerateResponse],
        ("application/json", SSE),
    ),
    ("POST", "/generate_stream"): ("TGI generate, streamed as Server-Sent Events", tgi.GenerateRequest, None, (SSE,)),
    ("POST", "/tokenize"): (
        "TGI tokenize: token ids with their text spans",
        tgi.TokenizeRequest,
        list[TokenSpan],
        ("application/json",),
    ),
    ("GET", "/info"): ("TGI info: model and limits", None, Info, ("application/json",)),
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
    components.update(schema.pop("$defs", {}))
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        components[kind.__name__] = schema
        return {"$ref": REF.format(model=kind.__name__)}
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
    chunk = STREAM_CHUNKS.get(path)
    data = (
        {"contentMediaType": "application/json", "contentSchema": _schema(chunk, components, "serialization")}
        if chunk
        else {}
    )
    styles = {"/invocations": Union[OpenAIError, TGIError]}  # its chat and completion streams fail OpenAI-style
    error = _schema(styles.get(path, OpenAIError if path.startswith("/v1/") else TGIError), components, "serialization")
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


def _errors(path: str, has_body: bool, components: dict[str, Any]) -> dict[str, Any]:
    """The error responses of a route: OpenAI-style bodies on /v1/*, TGI-style elsewhere."""
    error_model = OpenAIError if path.startswith("/v1/") else TGIError
    ref = _schema(error_model, components, "serialization")
    statuses = ERROR_STATUSES if has_body else {code: ERROR_STATUSES[code] for code in ("401", "503")}
    if path.startswith("/v1/") and has_body:  # OpenAI answers every invalid request with 400
        statuses = {code: text for code, text in statuses.items() if code != "422"}
        statuses["400"] = "The body is not JSON, or a field is missing, of the wrong type or out of range (see param)"
    errors = {
        code: {"description": text, "content": {"application/json": {"schema": ref}}} for code, text in statuses.items()
    }
    if path == "/ping":
        errors = {
            "503": {
                "description": "Loading, failed, or draining",
                "content": {"application/json": {"schema": _schema(Status, components, "serialization")}},
            }
        }
    return errors
