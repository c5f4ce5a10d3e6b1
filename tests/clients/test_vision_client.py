"""Images in chat messages through real gunicorn and the openai client: a tiny Qwen2.5-VL answers image_url parts
(data URLs), streamed or not, on /v1/chat/completions and /invocations; bad images get a 400 naming the problem;
a text-only model answers an image part with a 400 that says so."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from tests.helpers import start_server
from tests.vision_models import build_tiny_qwen2_5_vl


def data_url(seed: int, width: int = 84, height: int = 56) -> str:
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def asking(*urls: str, text: str = "What is in the picture?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory, embedded_folder):
    folder = build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny-qwen-vl"), embedded_folder)
    env = {
        "HF_MODEL_ID": str(folder),
        "MESSAGES_API_ENABLED": "true",
        "MAX_BATCH_TOTAL_TOKENS": "4096",
        "MAX_IMAGES_PER_REQUEST": "2",
        "MAX_IMAGE_PIXELS": "20000",
        "MAX_INPUT_TOKENS": "64",
    }
    server = start_server(env, tmp_path_factory.mktemp("vision-server-logs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def vision_client(vision_server):
    from openai import OpenAI

    return OpenAI(base_url=vision_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def answer(client, messages, **extra):
    return client.chat.completions.create(model="tgi", messages=messages, max_tokens=8, temperature=0, **extra)


def test_the_answer_depends_on_the_image_and_repeats_for_the_same_one(vision_client):
    first, other, again = (answer(vision_client, asking(data_url(seed))) for seed in (1, 2, 1))
    assert first.choices[0].message.content != other.choices[0].message.content
    assert again.choices[0].message.content == first.choices[0].message.content  # a prefix-cache hit changes nothing
    text_only = answer(vision_client, [{"role": "user", "content": "What is in the picture?"}])
    assert first.usage.prompt_tokens >= text_only.usage.prompt_tokens + 6  # the image's 6 tokens count as input


def test_a_streamed_answer_equals_the_whole_one(vision_client):
    messages = asking(data_url(3), data_url(4, 56, 84))
    whole = answer(vision_client, messages).choices[0].message.content
    stream = answer(vision_client, messages, stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == whole


def test_invocations_and_info_know_the_model_takes_images(vision_server):
    body = {"messages": asking(data_url(1)), "max_tokens": 4}
    reply = requests.post(vision_server.url + "/invocations", json=body, timeout=60)
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    assert requests.get(vision_server.url + "/info", timeout=10).json()["takes_images"] is True


@pytest.mark.parametrize(
    "url, problem",
    [
        ("https://example.com/cat.png", "ALLOW_IMAGE_URLS"),
        ("data:image/png;base64,not base64!", "base64"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "cannot be decoded"),
        ("ftp://example.com/cat.png", "data: URL"),
        (data_url(5, 200, 200), "MAX_IMAGE_PIXELS"),
    ],
)
def test_a_bad_image_is_a_400_naming_the_problem(vision_server, url, problem):
    reply = requests.post(vision_server.url + "/v1/chat/completions", json={"messages": asking(url)}, timeout=60)
    assert reply.status_code == 400 and problem in reply.json()["error"]["message"]


def test_image_tokens_count_toward_max_input_tokens(vision_server):
    big = asking(data_url(6, 140, 140), data_url(7, 140, 140))  # 25 image tokens each, with the text: over 64
    reply = requests.post(vision_server.url + "/v1/chat/completions", json={"messages": big}, timeout=60)
    assert reply.status_code in (400, 422) and "MAX_INPUT_TOKENS" in reply.json()["error"]["message"]
    small = asking(data_url(6), data_url(7))  # 6 image tokens each: within it
    assert requests.post(
        vision_server.url + "/v1/chat/completions", json={"messages": small, "max_tokens": 2}, timeout=60
    ).ok


def test_more_images_than_allowed_is_a_400_and_the_server_stays_healthy(vision_server):
    body = {"messages": asking(data_url(1), data_url(2), data_url(3))}
    reply = requests.post(vision_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400 and "MAX_IMAGES_PER_REQUEST" in reply.json()["error"]["message"]
    assert requests.get(vision_server.url + "/ping", timeout=10).status_code == 200


def test_a_text_only_model_answers_an_image_part_with_a_400(tiny_server):
    body = {"messages": asking(data_url(1)), "max_tokens": 4}
    reply = requests.post(tiny_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400 and "takes no images" in reply.json()["error"]["message"]
    assert requests.get(tiny_server.url + "/info", timeout=10).json()["takes_images"] is False


def test_the_responses_api_takes_input_image_parts(vision_server, vision_client):
    content = [{"type": "input_image", "image_url": data_url(1)}, {"type": "input_text", "text": "What is in it?"}]
    response = vision_client.responses.create(
        model="tgi", input=[{"role": "user", "content": content}], max_output_tokens=8, temperature=0
    )
    chat = answer(vision_client, asking(data_url(1), text="What is in it?"))
    assert response.output_text == chat.choices[0].message.content and response.usage.input_tokens > 20
