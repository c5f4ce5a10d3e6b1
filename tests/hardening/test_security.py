"""Security through the real server: API_KEY, secrets kept out of logs and bodies, sandboxed chat templates,
no pickle weights unless allowed, no route serving files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import requests

from serve.config import Settings
from serve.loading.source import ModelLoadError
from serve.loading.loader import load_model
from serve.http.security import RedactSecrets, check_api_key, scrub
from serve.errors import Unauthorized
from tests.helpers import start_server

pytestmark = pytest.mark.e2e

API_KEY = "sk-test-7f3a9c0d2e"
HF_TOKEN = "hf_SECRETtoken1234567890abcdef"
PROTECTED = [
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/generate"),
    ("POST", "/generate_stream"),
    ("POST", "/tokenize"),
    ("GET", "/info"),
    ("GET", "/health"),
    ("GET", "/metrics"),
]
BODIES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/v1/completions": {"prompt": "Hi", "max_tokens": 2},
    "/generate": {"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
    "/generate_stream": {"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
    "/tokenize": {"inputs": "Hi"},
}
# A chat template that tries to reach Python internals when a message says so (rendered in jinja's sandbox, it cannot)
ESCAPING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] == 'shell' %}{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}{% endif %}"
    "{% if message['content'] == 'classes' %}{{ message.__class__.__mro__[1].__subclasses__() }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def marker(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("escape") / "pwned"


@pytest.fixture(scope="module")
def secure_server(tiny_model_dir, tmp_path_factory, marker):
    folder = tmp_path_factory.mktemp("escaping-template") / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").write_text(ESCAPING_TEMPLATE.replace("MARKER", str(marker)))
    env = {"HF_MODEL_ID": str(folder), "API_KEY": API_KEY, "HF_TOKEN": HF_TOKEN, "LOG_LEVEL": "DEBUG"}
    server = start_server(env, tmp_path_factory.mktemp("secure-logs"))
    yield server
    server.stop()


def call(server, method: str, path: str, headers: dict) -> requests.Response:
    return requests.request(method, server.url + path, json=BODIES.get(path), headers=headers, timeout=60)


@pytest.mark.parametrize("method, path", PROTECTED)
def test_api_key_is_required_on_openai_and_tgi_routes(secure_server, method, path):
    for headers in (
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {API_KEY}"},
        {"Authorization": "Bearer"},
    ):
        refused = call(secure_server, method, path, headers)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer", (headers, refused.text)
        error = refused.json()["error"]
        assert "API key" in (error["message"] if isinstance(error, dict) else error)
    allowed = call(secure_server, method, path, {"Authorization": f"Bearer {API_KEY}"})
    assert allowed.status_code == 200, allowed.text


def test_ping_invocations_and_docs_stay_open(secure_server):
    assert requests.get(secure_server.url + "/ping", timeout=10).status_code == 200
    invoked = requests.post(
        secure_server.url + "/invocations", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=60
    )
    assert invoked.status_code == 200
    document = requests.get(secure_server.url + "/openapi.json", timeout=10).json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert (
        document["paths"]["/generate"]["post"]["security"] == [{"bearer": []}]
        and "security" not in document["paths"]["/ping"]["get"]
    )


@pytest.mark.parametrize("content", ["shell", "classes"])
def test_chat_template_cannot_reach_python_internals(secure_server, marker, content):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    refused = requests.post(secure_server.url + "/invocations", json=body, timeout=60)
    assert refused.status_code == 422, refused.text
    assert "messages" in refused.json()["error"] and "unsafe" in refused.json()["error"]
    assert not marker.exists()
    fine = requests.post(
        secure_server.url + "/invocations", json={**body, "messages": [{"role": "user", "content": "Hi"}]}, timeout=60
    )
    assert fine.status_code == 200


def test_secrets_never_in_logs_info_or_error_bodies(secure_server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    bodies = [requests.get(secure_server.url + "/info", headers=auth, timeout=10).text]
    bodies.append(
        requests.get(secure_server.url + "/info", headers={"Authorization": f"Bearer {API_KEY}x"}, timeout=10).text
    )
    bodies.append(
        requests.post(
            secure_server.url + "/generate",
            json={"inputs": HF_TOKEN, "parameters": {"top_p": 9}},
            headers=auth,
            timeout=10,
        ).text
    )
    bodies.append(
        requests.post(
            secure_server.url + "/v1/completions", data=b"{" + HF_TOKEN.encode(), headers=auth, timeout=10
        ).text
    )
    bodies.append(
        requests.post(
            secure_server.url + "/invocations", json={"messages": [{"role": HF_TOKEN, "content": "x"}]}, timeout=10
        ).text
    )
    for body in bodies:
        assert API_KEY not in body and HF_TOKEN not in body, body
    log = secure_server.log()
    assert "route=/invocations" in log  # the log is being written (at DEBUG)
    assert API_KEY not in log and HF_TOKEN not in log


def test_redaction_of_log_records_and_error_messages():
    secrets = (HF_TOKEN, API_KEY)
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "download failed with token %s", (HF_TOKEN,), None)
    assert RedactSecrets(secrets).filter(record) and HF_TOKEN not in record.getMessage()
    assert scrub(f"bad key {API_KEY}", secrets) == "bad key [redacted]"
    check_api_key(None, "/generate", None)  # no key configured: open
    check_api_key(API_KEY, "/ping", None)  # open route
    with pytest.raises(Unauthorized):
        check_api_key(API_KEY, "/generate", f"Bearer {API_KEY[:-1]}")


@pytest.fixture(scope="module")
def pickle_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its weights as pytorch_model.bin (a pickle) and no safetensors file."""
    import torch
    from safetensors.torch import load_file

    folder = tmp_path_factory.mktemp("pickle") / "model"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def test_pickle_weights_are_refused_by_default(pickle_model, tmp_path):
    server = start_server({"HF_MODEL_ID": str(pickle_model)}, tmp_path, wait=False)
    assert server.process.wait(180) != 0
    assert "ALLOW_PICKLE_WEIGHTS=true" in server.log() and "Traceback" not in server.log()


def test_pickle_weights_load_when_allowed(pickle_model):
    with pytest.raises(ModelLoadError, match="ALLOW_PICKLE_WEIGHTS"):
        load_model(Settings(model_id=str(pickle_model), model_dir="/nonexistent"))
    loaded = load_model(Settings(model_id=str(pickle_model), model_dir="/nonexistent", allow_unsafe_weights=True))
    assert loaded.model.config.num_hidden_layers == 2


def test_no_route_serves_files(client):
    rules = list(client.application.url_map.iter_rules())
    assert all(rule.endpoint != "static" for rule in rules)
    assert all("path" not in str(rule._converters) for rule in rules)  # no <path:...> parameter anywhere
    for path in ("/static/app.py", "/serve/config.py", "/../../etc/passwd", "/docs/../serve/app.py"):
        assert client.get(path).status_code == 404
