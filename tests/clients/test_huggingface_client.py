"""``huggingface_hub.InferenceClient`` (what TGI users call) against real gunicorn serving a tiny random Llama."""

from __future__ import annotations

import pytest

MESSAGES = [{"role": "user", "content": "What is deep learning?"}]


@pytest.fixture(scope="module")
def hf_client(tiny_server):
    from huggingface_hub import InferenceClient

    return InferenceClient(base_url=tiny_server.url, timeout=120)


def test_chat_completion_sync_and_stream(hf_client):
    sync = hf_client.chat_completion(MESSAGES, max_tokens=8, temperature=0.0, seed=1)
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in hf_client.chat_completion(MESSAGES, max_tokens=8, temperature=0.0, stream=True)
        if chunk.choices
    )
    assert sync.choices[0].message.content == streamed
    assert sync.usage.completion_tokens >= 1


def test_text_generation_with_details(hf_client):
    output = hf_client.text_generation(
        "The capital of France is",
        max_new_tokens=5,
        details=True,
        decoder_input_details=True,
        top_n_tokens=2,
        seed=4,
        do_sample=True,
    )
    details = output.details
    assert details.generated_tokens == len(details.tokens) and details.finish_reason in (
        "length",
        "eos_token",
        "stop_sequence",
    )
    assert "".join(token.text for token in details.tokens) == output.generated_text
    assert all(token.logprob <= 0 for token in details.tokens)
    assert details.prefill[0].logprob is None and all(token.logprob <= 0 for token in details.prefill[1:])
    assert len(details.top_tokens) == len(details.tokens) and all(len(top) == 2 for top in details.top_tokens)
    assert details.seed == 4


def test_text_generation_stream(hf_client):
    plain = hf_client.text_generation("Once upon a time", max_new_tokens=6)
    events = list(hf_client.text_generation("Once upon a time", max_new_tokens=6, stream=True, details=True))
    assert "".join(event.token.text for event in events) == plain
    assert events[-1].generated_text == plain and events[-1].details.generated_tokens == len(events)
    assert all(event.token.logprob <= 0 for event in events)


def test_text_generation_grammar(hf_client):
    output = hf_client.text_generation("My PIN is", max_new_tokens=8, grammar={"type": "regex", "value": "[0-9]{4}"})
    assert len(output) == 4 and output.isdigit()
