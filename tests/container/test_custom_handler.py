"""code/inference.py (input_fn/output_fn) and code/requirements.txt, through the real entrypoint and gunicorn."""

import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import requests

from tests.helpers import ENTRYPOINT, free_port, server_env, start_server

pytestmark = pytest.mark.e2e

DEP = "serve_handler_test_dep"  # a one-module wheel built here, installed from code/requirements.txt
HANDLER = f"""
import json
import {DEP}


def input_fn(request_body, content_type):
    if content_type != "text/csv":
        raise ValueError(f"expected text/csv, got {{content_type}}")
    prompt, tokens = request_body.decode().rsplit(",", 1)
    return {{"inputs": prompt, "parameters": {{"max_new_tokens": int(tokens)}}}}


def output_fn(prediction, accept):
    return {DEP}.PREFIX + prediction[0]["generated_text"], "text/plain"
"""


def build_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (no build backend, no network)."""
    wheel = folder / f"{DEP}-1.0-py3-none-any.whl"
    info = f"{DEP}-1.0.dist-info"
    files = {
        f"{DEP}/__init__.py": 'PREFIX = "handled: "\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {DEP}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


@pytest.fixture(scope="module")
def handler_server(tiny_model_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("model")
    code = model_dir / "code"
    code.mkdir()
    wheel = build_wheel(code)
    (code / "requirements.txt").write_text(f"--no-index\n./{wheel.name}\n")
    (code / "inference.py").write_text(textwrap.dedent(HANDLER))
    env = {"HF_MODEL_ID": str(tiny_model_dir), "SM_MODEL_DIR": str(model_dir), "MAX_CONCURRENT_REQUESTS": "4"}
    server = start_server(env, tmp_path_factory.mktemp("logs"))
    yield server
    server.stop()
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", DEP], check=False)


def test_input_fn_and_output_fn_wrap_invocations(handler_server):
    response = requests.post(
        handler_server.url + "/invocations",
        data="The capital of France is,5",
        headers={"Content-Type": "text/csv"},
        timeout=60,
    )
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    plain = requests.post(
        handler_server.url + "/generate",
        json={"inputs": "The capital of France is", "parameters": {"max_new_tokens": 5}},
        timeout=60,
    )
    assert response.text == "handled: " + plain.json()["generated_text"]  # the dependency's prefix + our generation
    assert response.headers["x-generated-tokens"] == "5"
    log = handler_server.log()
    assert "installing custom handler requirements" in log and "custom handler requirements installed" in log
    assert "custom handler" in log and "input_fn=True output_fn=True" in log


def test_input_fn_errors_are_400s_naming_it(handler_server):
    response = requests.post(handler_server.url + "/invocations", json={"inputs": "hi"}, timeout=30)
    assert response.status_code == 400
    assert (
        "input_fn in inference.py rejected the request: ValueError: expected text/csv, got application/json"
        in response.json()["error"]
    )


def test_failing_requirements_stop_the_start(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "requirements.txt").write_text("--no-index\nno-such-package-for-serve-tests==1.0\n")
    env = server_env({"SM_MODEL_DIR": str(tmp_path)}, free_port())
    result = subprocess.run([str(ENTRYPOINT), "serve"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "installing custom handler requirements" in result.stderr
    assert (
        "custom handler error: pip install -r" in result.stderr and "no-such-package-for-serve-tests" in result.stderr
    )
