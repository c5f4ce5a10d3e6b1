"""Every body the routes send is exactly its response model's dump (the models /openapi.json documents)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter

from serve.http.schemas import openai_responses as oa
from serve.http.schemas import tgi
from serve.errors import OpenAIError, TGIError
from serve.http.schemas.sagemaker import Status
from tests.helpers import sse_data

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}]
TGI = {"inputs": "Hi", "parameters": {"max_new_tokens": 3, "details": True, "top_n_tokens": 2}}


def conforms(model: Any, body: Any) -> None:
    """``body`` is what ``model`` dumps of it: the same keys in the same order, nothing added or left out."""
    adapter = TypeAdapter(model)
    assert json.dumps(adapter.dump_python(adapter.validate_python(body))) == json.dumps(body)


def events(response) -> list[Any]:
    assert response.status_code == 200, response.get_data(as_text=True)
    return [json.loads(data) for data in sse_data(response.get_data(as_text=True)) if data != "[DONE]"]


@pytest.mark.parametrize(
    "extra",
    [{}, {"logprobs": True, "top_logprobs": 2, "n": 2}, {"tools": TOOLS, "tool_choice": "required", "max_tokens": 8}],
)
def test_chat_completions_and_their_chunks(client, extra):
    body = {**CHAT, **extra}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.json
    conforms(oa.ChatCompletion, response.json)
    chunks = events(
        client.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    )
    for chunk in chunks:
        conforms(oa.ChatCompletionChunk, chunk)
    assert "usage" in chunks[-1] and not chunks[-1]["choices"]


@pytest.mark.parametrize("extra", [{}, {"echo": True, "logprobs": 2}, {"prompt": ["a", "b"], "n": 2}])
def test_text_completions_and_their_chunks(client, extra):
    body = {"prompt": "Hi", "max_tokens": 3, **extra}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.json
    conforms(oa.TextCompletion, response.json)
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    for chunk in events(client.post("/v1/completions", json=stream)):
        conforms(oa.TextCompletion, chunk)


@pytest.mark.parametrize(
    "parameters",
    [{}, {"decoder_input_details": True}, {"best_of": 2, "do_sample": True}, {"details": False, "top_n_tokens": None}],
)
def test_tgi_generate_and_its_stream(client, parameters):
    body = {**TGI, "parameters": {**TGI["parameters"], **parameters}}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.json
    conforms(tgi.GenerateResponse, response.json)
    conforms(list[tgi.GenerateResponse], client.post("/", json=body).json)
    if "best_of" not in parameters:
        for event in events(client.post("/generate_stream", json=body)):
            conforms(tgi.StreamResponse, event)


@pytest.mark.parametrize(
    ("method", "path", "model"),
    [
        ("get", "/v1/models", oa.ModelList),
        ("get", "/ping", Status),
    ],
)
def test_other_bodies(client, method, path, model: type[BaseModel]):
    response = getattr(client, method)(path)
    assert response.status_code == 200
    conforms(model, response.json)


def test_info_holds_its_documented_fields(client):
    body = client.get("/info").json
    assert tgi.Info.model_validate(body).model_dump() == body  # an open model: more fields once the model loads


def test_tokenize(client):
    conforms(list[tgi.TokenSpan], client.post("/tokenize", json={"inputs": "Hello world"}).json)


def test_error_bodies(client):
    conforms(OpenAIError, client.post("/v1/chat/completions", json={"messages": []}).json)
    conforms(TGIError, client.post("/generate", json={"inputs": ""}).json)
    conforms(TGIError, client.post("/invocations", json={"messages": []}).json)
