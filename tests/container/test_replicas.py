"""PLACEMENT=replicas on the CPU: two engines (two copies of the model) behind one gunicorn worker."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import start_server

pytestmark = pytest.mark.e2e


def generate(server, prompt: str, tokens: int) -> str:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": tokens, "ignore_eos": True}}
    response = requests.post(server.url + "/generate", json=body, timeout=180)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


def test_two_engines_share_the_load_and_answer_alike(replica_server):
    before = [engine["served"] for engine in requests.get(replica_server.url + "/info", timeout=10).json()["engines"]]
    info = requests.get(replica_server.url + "/info", timeout=10).json()
    assert info["placement"]["mode"] == "replicas" and info["placement"]["engines"] == [["cpu"], ["cpu"]]
    assert "REPLICAS" in info["placement"]["reason"] and info["devices"] == ["cpu"]
    assert info["max_batch_total_tokens"] == 2 * 4096  # the capacity of both engines
    prompts = ["The capital of France is", "Once upon a time", "The capital of France is", "Once upon a time"]
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda prompt: generate(replica_server, prompt, 24), prompts))
    assert texts[0] == texts[2] and texts[1] == texts[3]  # batched with other requests, greedy is unchanged
    engines = requests.get(replica_server.url + "/info", timeout=10).json()["engines"]
    served = [engine["served"] - earlier for engine, earlier in zip(engines, before)]
    assert served == [2, 2]  # least in flight first, then fewest served
    assert all(engine["in_flight"] == 0 for engine in engines)
    assert "placement: replicas on cpu (PLACEMENT=replicas)" in replica_server.log()
    assert replica_server.log().count("KV cache: ") == 2


def test_sequential_requests_alternate(replica_server):
    before = [engine["served"] for engine in requests.get(replica_server.url + "/info", timeout=10).json()["engines"]]
    texts = [generate(replica_server, "The capital of France is", 16) for _ in range(4)]
    assert len(set(texts)) == 1  # two requests on each engine: both copies loaded intact, greedy is identical
    after = [engine["served"] for engine in requests.get(replica_server.url + "/info", timeout=10).json()["engines"]]
    assert [b - a for a, b in zip(before, after)] == [2, 2]


def test_quantization_without_a_gpu_stops_the_start_with_the_reason(tiny_model_dir, tmp_path):
    server = start_server(
        {"HF_MODEL_ID": str(tiny_model_dir), "HF_MODEL_QUANTIZE": "bitsandbytes-nf4"}, tmp_path, wait=False
    )
    assert server.process.wait(180) != 0
    assert (
        "HF_MODEL_QUANTIZE=bitsandbytes-nf4 quantizes at load time with CUDA kernels, and no GPU is in use"
        in server.log()
    )


def test_info_reports_dtype_and_no_quantization(replica_server):
    info = requests.get(replica_server.url + "/info", timeout=10).json()
    assert info["model_dtype"] == "float32" and info["quantization"] is None and info["adapters"] == []
