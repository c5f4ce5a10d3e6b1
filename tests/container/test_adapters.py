"""LoRA adapters through the real entrypoint and gunicorn: header, OpenAI ``model`` and TGI ``adapter_id``."""

import pytest
import requests

from tests.unit.test_lora import make_adapter, merged_greedy
from tests.helpers import start_server

pytestmark = pytest.mark.e2e

HEADER = "X-Amzn-SageMaker-Adapter-Identifier"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapter_server(tiny_model_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model")
    sql = make_adapter(tiny_model_dir, model_dir / "adapters" / "sql", seed=1)  # found under SM_MODEL_DIR/adapters/
    chat = make_adapter(tiny_model_dir, tmp_path_factory.mktemp("elsewhere") / "chat", seed=2)  # named in LORA_ADAPTERS
    env = {
        "HF_MODEL_ID": str(tiny_model_dir),
        "SM_MODEL_DIR": str(model_dir),
        "LORA_ADAPTERS": f"chat={chat}",
        "MAX_CONCURRENT_REQUESTS": "8",
    }
    server = start_server(env, tmp_path_factory.mktemp("logs"))
    yield server, {"sql": sql, "chat": chat}
    server.stop()


def generate_ids(server, parameters: dict, headers: dict = None) -> list[int]:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "ignore_eos": True, "details": True, **parameters}}
    response = requests.post(server.url + "/generate", json=body, headers=headers or {}, timeout=60)
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


def test_adapters_are_listed(adapter_server):
    server, _ = adapter_server
    assert requests.get(server.url + "/info", timeout=10).json()["adapters"] == ["sql", "chat"]
    models = [model["id"] for model in requests.get(server.url + "/v1/models", timeout=10).json()["data"]]
    assert models[1:] == ["sql", "chat"]


def test_tgi_adapter_id_and_the_sagemaker_header_select_the_adapter(adapter_server, tiny_model_dir):
    server, folders = adapter_server
    prompt_ids = requests.post(server.url + "/tokenize", json={"inputs": PROMPT}, timeout=10).json()
    prompt = [token["id"] for token in prompt_ids]
    base = generate_ids(server, {})
    for name in ("sql", "chat"):
        by_field = generate_ids(server, {"adapter_id": name})
        by_header = generate_ids(server, {}, {HEADER: name})
        assert by_field == by_header == merged_greedy(tiny_model_dir, folders[name], prompt)[:8] != base


def test_openai_model_selects_an_adapter_and_other_names_mean_the_base(adapter_server):
    server, _ = adapter_server

    def chat(model: str, headers: dict = None) -> str:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 8,
            "temperature": 0,
            "ignore_eos": True,
        }
        response = requests.post(server.url + "/v1/chat/completions", json=body, headers=headers or {}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    assert chat("sql") == chat("tgi", {HEADER: "sql"}) != chat("tgi") == chat("some-other-name")


def test_unknown_adapters_are_4xx_naming_them(adapter_server):
    server, _ = adapter_server
    response = requests.post(
        server.url + "/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "nope"}}, timeout=30
    )
    assert response.status_code == 422
    assert (
        response.json()["error"] == "parameters.adapter_id: adapter 'nope' is not loaded (loaded adapters: sql, chat)"
    )
    response = requests.post(
        server.url + "/invocations", json={"inputs": PROMPT}, headers={HEADER: "missing"}, timeout=30
    )
    assert response.status_code == 422 and f"{HEADER}: adapter 'missing' is not loaded" in response.json()["error"]
    body = {"model": "tgi", "messages": [{"role": "user", "content": "Hi"}]}
    response = requests.post(server.url + "/v1/chat/completions", json=body, headers={HEADER: "missing"}, timeout=30)
    assert (
        response.status_code == 400 and "adapter 'missing' is not loaded" in response.json()["error"]["message"]
    )  # OpenAI's
