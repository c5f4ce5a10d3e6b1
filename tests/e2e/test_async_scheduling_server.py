"""ASYNC_SCHEDULING=true through real gunicorn on the CPU: concurrent seeded chat requests, whole and streamed with
the openai client, answer as the engine that reads each step first does; /info and /metrics say the host worked
ahead."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from openai import OpenAI

from tests.helpers import start_server

pytestmark = pytest.mark.e2e

QUESTIONS = ["What is deep learning?", "Name a river.", "Count to five.", "Why do leaves fall?"]


def answers(server) -> list[tuple[str, str]]:
    """(whole, streamed) answer of each question, all sent at once: seeded sampling, so a wrong input token shows."""
    client = OpenAI(base_url=server.url + "/v1", api_key="-")

    def ask(index: int) -> tuple[str, str]:
        messages = [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}]
        params = {"max_tokens": 12 + 3 * index, "temperature": 1.0, "seed": index, "extra_body": {"ignore_eos": True}}
        whole = client.chat.completions.create(model="tgi", messages=messages, **params)
        chunks = client.chat.completions.create(model="tgi", messages=messages, stream=True, **params)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        return whole.choices[0].message.content, streamed

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(ask, range(8)))


def steps_ahead(server) -> float:
    for line in requests.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("serve_engine_steps_ahead_total"):
            return float(line.split()[-1])
    raise AssertionError("serve_engine_steps_ahead_total is missing from /metrics")


def test_the_host_working_ahead_answers_as_the_engine_that_reads_each_step_first(tiny_server, tiny_model_dir, tmp_path):
    """The shared server reads each step first (auto: off on the CPU); a second one works ahead."""
    expected = answers(tiny_server)
    report = requests.get(tiny_server.url + "/info", timeout=10).json()["async_scheduling"]
    assert report["enabled"] is False and steps_ahead(tiny_server) == 0
    env = {"HF_MODEL_ID": str(tiny_model_dir), "MAX_BATCH_TOTAL_TOKENS": "4096", "ASYNC_SCHEDULING": "true"}
    server = start_server(env, tmp_path)
    try:
        ahead = answers(server)
        assert requests.get(server.url + "/info", timeout=10).json()["async_scheduling"]["enabled"] is True
        assert steps_ahead(server) > 10
    finally:
        server.stop()
    assert ahead == expected
    assert all(whole == streamed and whole for whole, streamed in ahead)
