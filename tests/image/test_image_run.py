"""The built image, run the way SageMaker runs it: entrypoint + `serve`, env vars, the model at /opt/ml/model.

`make image-test` builds the image (scripts/image/build.sh) and runs this module with SERVE_TEST_IMAGE set;
without it (plain `make test`) these tests are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import requests

from scripts.image.export_model import export_embedded_model
from tests.helpers import ROOT, english_words, free_port, wait_healthy
from tests.image.buildah import Container, image_config, terminate

IMAGE = os.environ.get("SERVE_TEST_IMAGE")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not IMAGE, reason="needs a built image: make image-test")]

TGI_INPUTS = {"inputs": "What is deep learning?", "parameters": {"max_new_tokens": 32}}
# What a SageMaker user sets, plus the limits an operator of a small CPU instance would set: a short default length
# and a small KV cache (a default one is GiBs to zero at start). SM_NUM_GPUS: the CPU test build sees no GPU, and
# the server takes only positive counts, so it is sent empty (= unset); SERVE_TEST_SM_NUM_GPUS overrides.
SAGEMAKER_ENV = {
    "SM_NUM_GPUS": os.environ.get("SERVE_TEST_SM_NUM_GPUS", ""),
    "DEFAULT_MAX_NEW_TOKENS": "32",
    "MAX_TOTAL_TOKENS": "1024",
    "MAX_BATCH_TOTAL_TOKENS": "4096",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_embedded_model(tmp_path_factory.mktemp("opt-ml") / "model")


@pytest.fixture
def container():
    box = Container(IMAGE)
    yield box
    box.remove()


def serve_and_wait(container, model_dir, tmp_path, extra_env):
    env = {**SAGEMAKER_ENV, **extra_env}
    server = container.serve(free_port(), env, {model_dir: "/opt/ml/model:ro"}, tmp_path / "serve.log")
    started = time.monotonic()
    wait_healthy(server, timeout=300)
    print(f"\n[image] serve -> /ping 200 in {time.monotonic() - started:.1f} s ({extra_env or 'TGI mode'})")
    return server


def stop_and_check(server):
    code, seconds = terminate(server)
    print(f"[image] SIGTERM -> exit {code} in {seconds:.1f} s")
    assert code == 0 and seconds < 25, server.log()[-3000:]


def test_image_declares_the_sagemaker_contract():
    config = image_config(IMAGE)
    assert config["Entrypoint"] == ["/opt/program/container/entrypoint.sh"] and config["Cmd"] == ["serve"]
    assert "8080/tcp" in config["ExposedPorts"]


def torch_version_in_image() -> str:
    pinned = next(line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch=="))
    return pinned.split("==")[1] + "+cpu"  # the test build's CPU wheel


def test_any_other_argument_is_executed_as_given(container):
    result = container.execute(["python3", "-c", "import sys, torch; print(torch.__version__, sys.argv[1])", "given"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [torch_version_in_image(), "given"]


def test_the_served_image_has_the_cpu_kernel_and_no_compiler(container):
    listing = container.execute(["sh", "-c", "ls /opt/program/serve/modeling/; command -v cc gcc || true"])
    assert listing.returncode == 0, listing.stderr
    names = listing.stdout.split()
    assert [name for name in names if name.startswith("serve_panels-") and name.endswith(".so")], names
    assert not [name for name in names if name.endswith(("/cc", "/gcc"))], names


def test_messages_api_from_opt_ml_model(container, model_dir, tmp_path):
    server = serve_and_wait(container, model_dir, tmp_path, {"MESSAGES_API_ENABLED": "true"})
    try:
        # `make docker-test`'s script: wait for /ping, send the reference messages request to /invocations
        smoke = subprocess.run(
            [sys.executable, str(ROOT / "scripts/image/smoke.py"), "--url", server.url, "--timeout", "60"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert smoke.returncode == 0, smoke.stderr
        body = json.loads(smoke.stdout.split("\n", 1)[1])
        answer = body["choices"][0]["message"]["content"]
        print(f"[image] messages answer: {answer[:200]!r}")
        assert body["object"] == "chat.completion" and english_words(answer) >= 5, answer
        assert "/opt/ml/model" in server.log()  # the mounted folder is the model source
        # the kernel built in the Dockerfile's cpu-kernel stage serves the float32 layers (no compiler in the image)
        info = requests.get(server.url + "/info", timeout=30).json()
        if info["model_dtype"] == "float32":  # DTYPE=auto: bfloat16 on CPUs that prefer it, which stays dense
            assert info["cpu_weights"].startswith("panel kernel (AVX"), info["cpu_weights"]
    finally:
        stop_and_check(server)


def test_tgi_inputs_when_the_switch_is_unset(container, model_dir, tmp_path):
    server = serve_and_wait(container, model_dir, tmp_path, {})
    try:
        response = requests.post(server.url + "/invocations", json=TGI_INPUTS, timeout=240)
        assert response.status_code == 200, response.text
        text = response.json()[0]["generated_text"]
        print(f"[image] TGI answer: {text[:200]!r}")
        assert english_words(text) >= 5, text
    finally:
        stop_and_check(server)
