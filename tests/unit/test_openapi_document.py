"""The OpenAPI document (serve.http.openapi) without a model: response schemas are the response models' own, errors are
documented in the style serve.errors.error_style picks, and serve.http.schemas stays free of HTTP code."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Iterator

import pytest
from flask import Flask

from serve.errors import ErrorStyle, error_style
from serve.http.openapi import ERROR_MODELS, REF, build_openapi
from serve.http.routes import docs, openai, tgi
from serve.sagemaker import adapter_routes as adapters  # the register / unregister routes
from serve.sagemaker import invocations as sagemaker
from serve.http.schemas import openai_responses as responses
from serve.http.schemas import tgi as tgi_schemas
from serve.errors import OpenAIError, TGIError
from serve.http.schemas.sagemaker import Status

SCHEMAS = Path(__file__).resolve().parents[2] / "serve" / "http" / "schemas"
RESPONSE_MODELS = (
    responses.ChatCompletion,
    responses.ChatCompletionChunk,
    responses.TextCompletion,
    responses.ModelList,
    tgi_schemas.GenerateResponse,
    tgi_schemas.StreamResponse,
    tgi_schemas.TokenSpan,
    tgi_schemas.Info,
    Status,
    OpenAIError,
    TGIError,
)


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    app = Flask("serve")
    for module in (sagemaker, openai, tgi, docs, adapters):
        app.register_blueprint(module.blueprint)
    return build_openapi(app, api_key_required=False)


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "$ref" in node:
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def ref(model: type) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def test_every_reference_resolves(document):
    names = {reference.rsplit("/", 1)[-1] for reference in refs(document)}
    assert names <= set(document["components"]["schemas"])


@pytest.mark.parametrize("model", RESPONSE_MODELS, ids=lambda model: model.__name__)
def test_response_schemas_are_the_models_own(document, model):
    schema = model.model_json_schema(ref_template=REF, mode="serialization")
    components = document["components"]["schemas"]
    for name, definition in {**schema.pop("$defs", {}), model.__name__: schema}.items():
        assert components[name] == definition, name


def test_the_bodies_each_route_answers_with(document):
    paths = document["paths"]
    json_ok = {
        path: paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        for path, method in (
            ("/v1/chat/completions", "post"),
            ("/generate", "post"),
            ("/v1/models", "get"),
            ("/ping", "get"),
        )
    }
    assert json_ok == {
        "/v1/chat/completions": ref(responses.ChatCompletion),
        "/generate": ref(tgi_schemas.GenerateResponse),
        "/v1/models": ref(responses.ModelList),
        "/ping": ref(Status),
    }


def test_a_field_left_out_when_empty_is_optional_and_never_null(document):
    chunk = document["components"]["schemas"]["ChatCompletionChunk"]
    assert "usage" not in chunk["required"] and chunk["properties"]["usage"] == ref(responses.Usage)
    choice = document["components"]["schemas"]["ChunkChoice"]
    assert {"logprobs", "finish_reason"} <= set(choice["required"])  # sent as null, never left out


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate", "/", "/invocations"])
def test_error_responses_take_the_style_of_the_path(document, path):
    responses_ = document["paths"][path]["post"]["responses"]
    expected = ref(ERROR_MODELS[error_style(path)])
    for code in ("401", "413", "429", "503"):
        assert responses_[code]["content"]["application/json"]["schema"] == expected, code
    assert ("422" in responses_) is (error_style(path) is ErrorStyle.TGI)  # OpenAI answers invalid requests with 400


def stream_error(document: dict[str, Any], path: str) -> dict[str, Any]:
    sse = document["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    return sse["oneOf"][1]["properties"]["data"]["contentSchema"]


def test_stream_errors_take_the_style_of_the_streaming_api(document):
    assert stream_error(document, "/v1/chat/completions") == ref(OpenAIError)
    assert stream_error(document, "/generate_stream") == ref(TGIError)
    assert stream_error(document, "/invocations") == {"anyOf": [ref(OpenAIError), ref(TGIError)]}


@pytest.mark.parametrize("source", sorted(SCHEMAS.glob("*.py")), ids=lambda path: path.name)
def test_schemas_hold_no_http_code(source):
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not {
        name for name in imported if name.split(".")[0] in ("flask", "werkzeug") or name == "serve.http.security"
    }
