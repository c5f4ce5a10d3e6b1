"""TGI's own Python client (``text-generation``) against real gunicorn: its generate reads ``payload[0]`` of ``/``, and
its chat sends every unset field as an explicit ``null``."""

from __future__ import annotations

import asyncio

import pytest
import requests
from text_generation import AsyncClient, Client
from text_generation.types import Message

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def tgi_client(tiny_server) -> Client:
    return Client(tiny_server.url, timeout=120)


def test_root_route_answers_a_list_as_tgi_does(tiny_server):
    response = requests.post(
        tiny_server.url + "/", json={"inputs": "test", "parameters": {"max_new_tokens": 1}}, timeout=60
    )
    assert response.status_code == 200 and isinstance(response.json(), list) and len(response.json()) == 1
    assert isinstance(response.json()[0]["generated_text"], str)


def test_text_generation_client_generate(tgi_client, tiny_server):
    output = tgi_client.generate(PROMPT, max_new_tokens=4, decoder_input_details=True, top_n_tokens=2)
    details = output.details
    assert details.generated_tokens == len(details.tokens) >= 1
    assert "".join(token.text for token in details.tokens) == output.generated_text
    assert details.prefill[0].logprob is None and all(token.logprob <= 0 for token in details.prefill[1:])
    same = requests.post(
        tiny_server.url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}}, timeout=60
    )
    assert same.json()["generated_text"] == output.generated_text  # greedy, as TGI's default


def test_text_generation_client_generate_stream(tgi_client):
    plain = tgi_client.generate(PROMPT, max_new_tokens=5).generated_text
    events = list(tgi_client.generate_stream(PROMPT, max_new_tokens=5))
    assert "".join(event.token.text for event in events) == plain and events[-1].generated_text == plain


def test_text_generation_client_chat_sends_nulls(tgi_client):
    """``Client.chat`` posts ``n``, ``logprobs``, ``presence_penalty``, ``logit_bias``, ... as null: all unset."""
    messages = [Message(role="system", content="You are a helpful assistant."), Message(role="user", content="Hi")]
    response = tgi_client.chat(messages, max_tokens=5, temperature=0.0)
    assert len(response.choices) == 1 and isinstance(response.choices[0].message.content, str)
    assert response.choices[0].finish_reason in ("stop", "length") and response.usage["completion_tokens"] >= 1


def test_text_generation_async_client_chat_and_generate(tiny_server):
    async def both():
        client = AsyncClient(tiny_server.url, timeout=120)
        chat = await client.chat([Message(role="user", content="What is deep learning?")], max_tokens=4, seed=3)
        generated = await client.generate(PROMPT, max_new_tokens=3)
        return chat, generated

    chat, generated = asyncio.run(both())
    assert chat.choices[0].message.role == "assistant" and chat.usage["completion_tokens"] >= 1
    assert generated.details.generated_tokens >= 1


def test_explicit_nulls_through_the_openai_client(openai_client):
    messages = [{"role": "user", "content": "Hi"}]
    nulls = dict(
        n=None,
        logprobs=None,
        top_logprobs=None,
        frequency_penalty=None,
        presence_penalty=None,
        stop=None,
        seed=None,
        temperature=None,
        top_p=None,
        logit_bias=None,
        stream_options=None,
        response_format=None,
    )
    chat = openai_client.chat.completions.create(model="tgi", messages=messages, max_tokens=3, stream=None, **nulls)
    assert len(chat.choices) == 1 and chat.choices[0].logprobs is None
    shared = {k: v for k, v in nulls.items() if k not in ("logprobs", "top_logprobs", "response_format")}
    completion = openai_client.completions.create(
        model="tgi",
        prompt="Hi",
        max_tokens=3,
        echo=None,
        logprobs=None,
        best_of=None,
        suffix=None,
        user=None,
        stream=None,
        **shared,
    )
    assert len(completion.choices) == 1 and completion.choices[0].logprobs is None


def test_nulls_in_tgi_parameters(tiny_server):
    parameters = {"max_new_tokens": 2, "temperature": None, "top_k": None, "stop": None, "seed": None, "grammar": None}
    response = requests.post(
        tiny_server.url + "/generate", json={"inputs": PROMPT, "parameters": parameters}, timeout=60
    )
    assert response.status_code == 200, response.text
