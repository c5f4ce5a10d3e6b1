"""TENSOR_PARALLEL_SIZE=2 through real gunicorn on the CPU (two ranks over gloo): the seed's chat request, whole and
streamed with the openai client, answers as one rank does; /info says how the model was placed."""

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
