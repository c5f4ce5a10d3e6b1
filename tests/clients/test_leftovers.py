"""What the peers' own client suites caught, through the official clients against real gunicorn: TGI's details
(prefill only when asked, best_of_sequences with best_of), stream chunks clients concatenate, JSON sent as text,
TGI's watermark, and response_format with tools."""

from __future__ import annotations

import json

import openai
import pytest
import requests
from text_generation import Client

from serve.engine.types import Watermark
from serve.engine.watermark import green_list

PROMPT = "The capital of France is"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
FORMAT = {"type": "json_object"}


@pytest.fixture(scope="module")
def tgi_client(tiny_server) -> Client:
    return Client(tiny_server.url, timeout=120)


def test_tgi_client_gets_prefill_only_when_it_asks(tgi_client):
    plain = tgi_client.generate(PROMPT, max_new_tokens=2)
    assert plain.details.prefill == []  # TGI fills prefill only with decoder_input_details
    asked = tgi_client.generate(PROMPT, max_new_tokens=2, decoder_input_details=True)
    assert len(asked.details.prefill) >= 2 and asked.details.prefill[0].logprob is None


def test_tgi_client_gets_best_of_sequences_with_their_seeds(tgi_client):
    output = tgi_client.generate("test", max_new_tokens=2, best_of=2, do_sample=True, decoder_input_details=True)
    assert output.details.seed is not None
    assert output.details.best_of_sequences is not None and len(output.details.best_of_sequences) == 1
    assert output.details.best_of_sequences[0].seed is not None
    single = tgi_client.generate("test", max_new_tokens=2, do_sample=True)
    assert single.details.best_of_sequences is None


def test_streamed_chat_content_concatenates_as_openai_sends_it(openai_client, tiny_server):
    """Every chunk that carries text carries a string, the role chunk ``""`` (as OpenAI), and no delta holds a
    ``content: null``."""
    stream = openai_client.chat.completions.create(model="tgi", messages=USER, max_tokens=6, stream=True, temperature=0)
    chunks = [chunk for chunk in stream if chunk.choices]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    text = "".join(chunk.choices[0].delta.content for chunk in chunks[:-1])
    sync = openai_client.chat.completions.create(model="tgi", messages=USER, max_tokens=6, temperature=0)
    assert text == sync.choices[0].message.content
    raw = requests.post(
        tiny_server.url + "/v1/chat/completions",
        json={"messages": USER, "max_tokens": 6, "stream": True, "tools": [WEATHER], "logprobs": True},
        stream=True,
        timeout=60,
    )
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in raw.iter_lines(decode_unicode=True)
              if line.startswith("data: {") and '"choices":[{' in line]  # fmt: skip
    assert deltas and all(delta.get("content", "") is not None for delta in deltas), deltas


def test_json_sent_as_text_is_a_415_as_tgi_answers(openai_client, tiny_server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
    response = requests.post(
        tiny_server.url + "/generate", data=json.dumps(body), headers={"Content-Type": "text/plain"}, timeout=30
    )
    assert response.status_code == 415, response.text
    assert response.json()["error"] == "Expected request with `Content-Type: application/json`"
    with pytest.raises(openai.APIStatusError) as refused:
        openai_client.chat.completions.create(
            model="tgi", messages=USER, max_tokens=2, extra_headers={"Content-Type": "text/plain"}
        )
    assert refused.value.status_code == 415 and "application/json" in refused.value.message


def green_share(tiny_model_dir, prompt_ids: list[int], tokens: list[int], gamma: float) -> float:
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    previous = [prompt_ids[-1]] + tokens[:-1]
    green = [token in set(green_list(before, vocab, gamma).tolist()) for before, token in zip(previous, tokens)]
    return sum(green) / len(green)


def test_tgi_client_watermark_favours_the_green_list(tgi_client, tiny_server, tiny_model_dir):
    prompt_ids = [token["id"] for token in requests.post(
        tiny_server.url + "/tokenize", json={"inputs": PROMPT}, timeout=30).json()]  # fmt: skip
    gamma = Watermark().gamma
    marked = tgi_client.generate(PROMPT, max_new_tokens=16, watermark=True, stop_sequences=[])
    plain = tgi_client.generate(PROMPT, max_new_tokens=16)
    marked_share = green_share(tiny_model_dir, prompt_ids, [t.id for t in marked.details.tokens], gamma)
    plain_share = green_share(tiny_model_dir, prompt_ids, [t.id for t in plain.details.tokens], gamma)
    assert marked_share >= 0.9 and marked_share > plain_share, (marked_share, plain_share)


def test_response_format_with_tools_is_refused_with_tgis_message(openai_client, tiny_server):
    with pytest.raises(openai.BadRequestError, match="Grammar and tools are mutually exclusive"):
        openai_client.chat.completions.create(
            model="tgi", messages=USER, max_tokens=4, tools=[WEATHER], response_format=FORMAT
        )
    tgi_style = requests.post(
        tiny_server.url + "/invocations",
        json={"messages": USER, "max_tokens": 4, "tools": [], "response_format": FORMAT},
        timeout=30,
    )
    assert tgi_style.status_code == 422
    assert tgi_style.json() == {"error": "Grammar and tools are mutually exclusive", "error_type": "grammar and tools"}
    alone = openai_client.chat.completions.create(model="tgi", messages=USER, max_tokens=4, tools=[WEATHER])
    assert alone.choices[0].finish_reason in ("stop", "length", "tool_calls")
