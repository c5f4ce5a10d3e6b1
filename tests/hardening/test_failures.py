"""A model whose forward raises, served by the real gunicorn: 424 or an in-band SSE error, then the engine goes on.

The failure is injected the way a model repository would ship custom code (``auto_map`` + a modeling file, loaded
only with HF_MODEL_TRUST_REMOTE_CODE=true), so the server itself is not patched. The same folder shows that custom
code never runs under the default settings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests

from serve.config import Settings
from serve.loading.loader import load_model
from tests.helpers import sse_data, start_server

pytestmark = pytest.mark.e2e

TRIGGER_WORD = "zebra"
MODELING = '''
from pathlib import Path

from transformers import LlamaForCausalLM

Path(__file__).with_name("custom-code-ran").touch()  # proof that this file was imported


class ExplodingLlama(LlamaForCausalLM):
    """Raises inside forward whenever the configured token id is among its inputs."""

    def forward(self, input_ids=None, **kwargs):
        if input_ids is not None and bool((input_ids == self.config.explode_on_token).any()):
            raise RuntimeError("injected failure in forward")
        return super().forward(input_ids=input_ids, **kwargs)
'''


@pytest.fixture(scope="module")
def exploding_model(tiny_model_dir, tmp_path_factory) -> tuple[Path, int]:
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("exploding") / "model"
    shutil.copytree(tiny_model_dir, folder)
    trigger = AutoTokenizer.from_pretrained(str(folder))(TRIGGER_WORD, add_special_tokens=False)["input_ids"][0]
    config = json.loads((folder / "config.json").read_text())
    config.update({"auto_map": {"AutoModelForCausalLM": "exploding.ExplodingLlama"}, "explode_on_token": trigger})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "exploding.py").write_text(MODELING)
    return folder, trigger


def test_custom_model_code_does_not_run_by_default(exploding_model):
    folder, _ = exploding_model
    loaded = load_model(Settings(model_id=str(folder), model_dir="/nonexistent"))
    assert type(loaded.model).__name__ in ("LlamaForServing", "LlamaForCausalLM")  # not the checkpoint's own
    assert not (folder / "custom-code-ran").exists()


@pytest.fixture(scope="module")
def exploding_server(exploding_model, tmp_path_factory):
    folder, _ = exploding_model
    env = {"HF_MODEL_ID": str(folder), "HF_MODEL_TRUST_REMOTE_CODE": "true", "MAX_CONCURRENT_REQUESTS": "4"}
    server = start_server(env, tmp_path_factory.mktemp("exploding-logs"))
    yield server
    server.stop()


def chat(word: str, stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": word}], "max_tokens": 4, "stream": stream}


def test_failing_forward_gets_424_then_the_engine_serves_on(exploding_server):
    url = exploding_server.url
    for path, body in (("/v1/chat/completions", chat(TRIGGER_WORD, False)), ("/generate", {"inputs": TRIGGER_WORD})):
        failed = requests.post(url + path, json=body, timeout=60)
        assert failed.status_code == 424, failed.text
        error = failed.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        assert "injected failure in forward" in message and "Traceback" not in failed.text
    ok = requests.post(url + "/v1/chat/completions", json=chat("hello", False), timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert requests.get(url + "/ping", timeout=10).status_code == 200


def test_failing_forward_mid_stream_sends_an_error_event(exploding_server):
    url = exploding_server.url
    streamed = requests.post(url + "/v1/chat/completions", json=chat(TRIGGER_WORD, True), timeout=60)
    assert streamed.status_code == 200  # admitted and started before the model ran
    assert "event: error" in streamed.text
    error = json.loads(sse_data(streamed.text)[-1])["error"]
    assert error["type"] == "generation" and "injected failure" in error["message"]
    tgi_stream = requests.post(url + "/generate_stream", json={"inputs": TRIGGER_WORD}, timeout=60)
    assert "event: error" in tgi_stream.text and json.loads(sse_data(tgi_stream.text)[-1])["error_type"] == "generation"
    ok = requests.post(url + "/v1/chat/completions", json=chat("hello", True), timeout=60)
    assert sse_data(ok.text)[-1] == "[DONE]"
    assert Path(exploding_server.log_path).exists() and "engine step failed" in exploding_server.log()
