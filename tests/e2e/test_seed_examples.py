"""Every example of the TGI Messages API page, against the real entrypoint serving the embedded SmolLM2 (port aside)."""

import json
import subprocess

import pytest
import requests
from openai import OpenAI

from tests.helpers import english_words, sse_data, start_server

pytestmark = pytest.mark.e2e

SEED_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is deep learning?"},
]

# The seed examples send no max_tokens; at temperature 1 a 135M model can ramble for thousands of tokens. The server
# caps the default length, as an operator fitting SageMaker's 60 s invocation timeout would; the examples stay
# unchanged. 48 tokens is a few sentences: enough to judge the English, half the CPU time of 96.
BOUNDED = {"DEFAULT_MAX_NEW_TOKENS": "48"}


@pytest.fixture(scope="module")
def smollm_server(tmp_path_factory):
    """Zero configuration: no HF_MODEL_ID, no /opt/ml/model -> the embedded default, TGI mode on /invocations."""
    server = start_server(BOUNDED, tmp_path_factory.mktemp("logs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def messages_server(tmp_path_factory):
    server = start_server({"MESSAGES_API_ENABLED": "true", **BOUNDED}, tmp_path_factory.mktemp("logs"))
    yield server
    server.stop()


def test_seed_curl_stream(smollm_server):
    body = json.dumps({"model": "tgi", "messages": SEED_MESSAGES, "stream": True, "max_tokens": 20})
    result = subprocess.run(
        [
            "curl",
            "-sS",
            f"{smollm_server.url}/v1/chat/completions",
            "-X",
            "POST",
            "-d",
            body,
            "-H",
            "Content-Type: application/json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    data = sse_data(result.stdout)
    assert data[-1] == "[DONE]"
    text = "".join(json.loads(d)["choices"][0]["delta"].get("content") or "" for d in data[:-1])
    assert english_words(text) >= 5, text


def test_seed_openai_client_streaming(smollm_server):
    client = OpenAI(base_url=f"{smollm_server.url}/v1", api_key="-")
    chat_completion = client.chat.completions.create(model="tgi", messages=SEED_MESSAGES, stream=True)
    pieces = [message.choices[0].delta.content or "" for message in chat_completion if message.choices]
    text = "".join(pieces)
    assert len(pieces) > 5 and english_words(text) >= 5, text


def test_seed_openai_client_synchronous(smollm_server):
    client = OpenAI(base_url=f"{smollm_server.url}/v1", api_key="-")
    chat_completion = client.chat.completions.create(model="tgi", messages=SEED_MESSAGES, stream=False)
    text = chat_completion.choices[0].message.content
    assert chat_completion.id.startswith("chatcmpl-") and chat_completion.choices[0].finish_reason in ("stop", "length")
    assert chat_completion.usage.completion_tokens > 0 and english_words(text) >= 5, text


def test_invocations_tgi_payload(smollm_server):
    response = requests.post(
        smollm_server.url + "/invocations",
        json={"inputs": "What is deep learning?", "parameters": {"max_new_tokens": 30}},
        timeout=120,
    )
    assert response.status_code == 200
    assert english_words(response.json()[0]["generated_text"]) >= 3


def test_sagemaker_messages_api_predict(messages_server):
    """The deploy snippet's predictor.predict({"messages": [...]}) body, sent as the SageMaker runtime sends it."""
    response = requests.post(messages_server.url + "/invocations", json={"messages": SEED_MESSAGES}, timeout=300)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and english_words(body["choices"][0]["message"]["content"]) >= 5
    rejected = requests.post(
        messages_server.url + "/invocations", json={"inputs": "What is deep learning?"}, timeout=30
    )
    assert rejected.status_code == 422 and "messages" in rejected.json()["error"]
