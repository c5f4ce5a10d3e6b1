"""CLOUDWATCH_METRICS through gunicorn: the worker's stdout carries one valid EMF line per interval."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.emf_schema import validate_emf
from tests.helpers import start_server, wait_for

pytestmark = pytest.mark.e2e


def emf_lines(server) -> list[dict]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith('{"_aws"')]


def test_emf_lines_report_the_interval_on_stdout(tiny_model_dir, tmp_path):
    env = {
        "HF_MODEL_ID": str(tiny_model_dir),
        "CLOUDWATCH_METRICS": "true",
        "CLOUDWATCH_METRICS_INTERVAL": "1",
        "SAGEMAKER_ENDPOINT_NAME": "chat-endpoint",
        "SAGEMAKER_VARIANT_NAME": "AllTraffic",
        "MAX_CONCURRENT_REQUESTS": "1",
    }
    server = start_server(env, tmp_path)
    try:
        body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 30, "ignore_eos": True}}
        with ThreadPoolExecutor(6) as pool:
            statuses = list(
                pool.map(
                    lambda _: requests.post(server.url + "/invocations", json=body, timeout=60).status_code, range(6)
                )
            )
        assert 200 in statuses and 429 in statuses and set(statuses) <= {200, 429}
        assert wait_for(
            lambda: sum(line["Throttled429"] for line in emf_lines(server)) == statuses.count(429), timeout=10
        )
        time.sleep(1.5)
        lines = emf_lines(server)
        for document in lines:
            validate_emf(document)
            assert (document["EndpointName"], document["VariantName"]) == ("chat-endpoint", "AllTraffic")
            assert document["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "sagemaker-llm-serve"
        busy = [line for line in lines if line["OutputTokensPerSecond"] > 0]
        assert busy and all(line["TimeToFirstTokenP90"] >= line["TimeToFirstTokenP50"] > 0 for line in busy)
        assert sum(line["OutputTokensPerSecond"] for line in busy) > 0 and lines[-1]["QueueLength"] == 0
    finally:
        server.stop()
