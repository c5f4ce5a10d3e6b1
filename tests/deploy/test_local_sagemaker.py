"""`make local-sagemaker`: what SageMaker does with our image, without docker. The real entrypoint (`serve`) runs
with SageMaker's environment (MESSAGES_API_ENABLED as the SDK sends a stringified bool, the model under an
/opt/ml/model-style folder named by SM_MODEL_DIR, no HF_MODEL_ID); we wait for /ping as SageMaker's health check
does, then send the TGI Messages API page's request to /invocations.

The tiny-model test runs in `make test`; `make local-sagemaker` also runs the embedded SmolLM2 one (slow)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import requests

from tests.helpers import english_words, start_server

pytestmark = pytest.mark.e2e

# The request from the SageMaker section of the reference page, exactly as written there.
SEED_REQUEST = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is deep learning?"},
    ]
}


def sagemaker_env(model_dir: Path) -> dict[str, str]:
    """The container's environment on a SageMaker endpoint deployed by deploy/deploy.py."""
    import torch

    env = {
        "SM_MODEL_DIR": str(model_dir),
        "MESSAGES_API_ENABLED": "True",
        "DEFAULT_MAX_NEW_TOKENS": "48",
        "SAGEMAKER_PROGRAM": "",
        "SAGEMAKER_SUBMIT_DIRECTORY": "",
        "SAGEMAKER_CONTAINER_LOG_LEVEL": "20",
        "SAGEMAKER_REGION": "us-east-1",
    }
    if torch.cuda.is_available():
        env["SM_NUM_GPUS"] = str(torch.cuda.device_count())
    return env


def opt_ml_model(source: Path, root: Path) -> Path:
    """Lay the model out the way SageMaker unpacks model.tar.gz: files directly under .../opt/ml/model."""
    target = root / "opt" / "ml" / "model"
    shutil.copytree(source, target)
    return target


def serve_and_ask(source: Path, tmp_path: Path) -> dict:
    model_dir = opt_ml_model(source, tmp_path)
    server = start_server(sagemaker_env(model_dir), tmp_path, timeout=300)
    try:
        assert requests.get(server.url + "/ping", timeout=2).status_code == 200
        assert requests.get(server.url + "/info", timeout=10).json()["model_id"] == str(model_dir)
        response = requests.post(server.url + "/invocations", json=SEED_REQUEST, timeout=300)
        assert response.status_code == 200, response.text
        assert "model source: sagemaker" in server.log()
        return response.json()
    finally:
        server.stop()


def test_local_sagemaker_tiny_model(tiny_model_dir, tmp_path):
    completion = serve_and_ask(tiny_model_dir, tmp_path)
    assert completion["object"] == "chat.completion"
    choice = completion["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    assert 1 <= completion["usage"]["completion_tokens"] <= 48


@pytest.mark.slow
def test_local_sagemaker_embedded_model_answers_in_english(embedded_folder, tmp_path):
    completion = serve_and_ask(embedded_folder, tmp_path)
    answer = completion["choices"][0]["message"]["content"]
    assert english_words(answer) >= 10, answer
    assert "learn" in answer.lower(), answer
