"""TENSOR_PARALLEL_SIZE=2 through real gunicorn on the CPU (two ranks over gloo): the seed's chat request, whole and
streamed with the openai client, answers as one rank does; /info says how the model was placed."""

import psutil
import pytest
import requests
from openai import OpenAI

from tests.helpers import start_server

pytestmark = pytest.mark.e2e

SEED_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is deep learning?"},
]
GREEDY = {"max_tokens": 24, "temperature": 0, "extra_body": {"ignore_eos": True}}


def answers(server) -> tuple[str, str]:
    """(the whole answer, the streamed answer joined) of the seed's chat request, greedy."""
    client = OpenAI(base_url=server.url + "/v1", api_key="-")
    whole = client.chat.completions.create(model="tgi", messages=SEED_MESSAGES, **GREEDY)
    chunks = client.chat.completions.create(model="tgi", messages=SEED_MESSAGES, stream=True, **GREEDY)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    return whole.choices[0].message.content, streamed


def test_two_ranks_serve_the_seed_chat_request_as_one_does(tiny_model_dir, tmp_path):
    env = {"HF_MODEL_ID": str(tiny_model_dir), "MESSAGES_API_ENABLED": "true", "MAX_BATCH_TOTAL_TOKENS": "4096"}
    one = start_server(env, tmp_path)
    try:
        expected = answers(one)
    finally:
        one.stop()
    two = start_server({**env, "TENSOR_PARALLEL_SIZE": "2"}, tmp_path)
    try:
        placement = requests.get(two.url + "/info", timeout=10).json()["placement"]
        assert (placement["mode"], placement["tensor_parallel_size"]) == ("tensor-parallel", 2)
        assert answers(two) == expected
        assert expected[0] == expected[1] and len(expected[0]) > 0
        assert "tensor parallel: 2 ranks on cpu (gloo)" in two.log()
    finally:
        two.stop()


def test_a_killed_rank_fails_its_requests_and_the_copy_comes_back(slow_model_dir, tmp_path):
    """SIGKILL to rank 1 of a TP=2 copy under gunicorn: the request in flight ends with an error naming the rank,
    the copy is restarted (ranks and all), and it serves again."""
    import os
    import signal
    import threading

    from tests.hardening.conftest import gauge
    from tests.hardening.test_engine_recovery import LONG_GENERATE, engine_pids, pings_until_healthy
    from tests.helpers import wait_for

    env = {"HF_MODEL_ID": str(slow_model_dir), "TENSOR_PARALLEL_SIZE": "2", "MAX_BATCH_TOTAL_TOKENS": "4096"}
    server = start_server(env, tmp_path)
    try:
        pids = engine_pids(server)
        ranks = [pid for pid in pids if psutil.Process(pid).ppid() in pids]  # rank 1: a child of the engine process
        assert len(pids) == 2 and len(ranks) == 1
        failed: list = []
        post = lambda: failed.append(requests.post(server.url + "/generate", json=LONG_GENERATE, timeout=120))  # noqa: E731
        waiter = threading.Thread(target=post)
        waiter.start()
        assert wait_for(lambda: gauge(server, "serve_requests_in_flight") == 1, timeout=30)
        os.kill(ranks[0], signal.SIGKILL)
        waiter.join(120)
        assert failed[0].status_code == 424 and "tensor-parallel rank 1" in failed[0].text, failed[0].text
        assert (200, "healthy") in pings_until_healthy(server)
        assert not set(engine_pids(server)) & set(pids) and len(engine_pids(server)) == 2
        served = requests.post(server.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}})
        assert served.status_code == 200, served.text
        assert "engine stops serving: tensor-parallel rank 1" in server.log()
    finally:
        server.stop()
