"""Fixtures for the deploy tests: moto standing in for AWS, our real server behind the local runtime endpoint,
and the deploy virtualenv (.venv-deploy, SageMaker SDK v2) that runs the deploy scripts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import boto3
import pytest
import requests

from deploy.local_endpoint import LocalRuntime, start_in_thread
from tests.helpers import ROOT, Server, start_server

DEPLOY = ROOT / "deploy"
REGION = "us-east-1"
INSTANCE_TYPE = "ml.g4dn.xlarge"  # moto's instance-type enum has no ml.g5.*; the scripts' default stays ml.g5.2xlarge
IMAGE_URI = "123456789012.dkr.ecr.us-east-1.amazonaws.com/sagemaker-llm-serve:test"


@pytest.fixture(scope="session")
def deploy_python() -> Path:
    """The deploy virtualenv's interpreter (`make install-deploy`; `make test` builds it first)."""
    python = Path(os.environ.get("DEPLOY_PYTHON", ROOT / ".venv-deploy" / "bin" / "python"))
    if not python.exists():
        message = f"{python} is missing: run `make install-deploy` (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """A moto server (ThreadedMotoServer) on a free localhost port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws(moto_url) -> Iterator[str]:
    """A clean moto account for each test."""
    requests.post(f"{moto_url}/moto-api/reset", timeout=30).raise_for_status()
    yield moto_url


def aws_env(moto_url: str, runtime_url: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for a deploy script: fake credentials, every AWS call to moto, the runtime to ``runtime_url``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION=REGION,
        AWS_ENDPOINT_URL=moto_url,
        AWS_MAX_ATTEMPTS="1",  # the SDK's role lookup asks the public STS endpoint, unreachable here: fail fast
        AWS_CONFIG_FILE="/nonexistent",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
    )
    if runtime_url:
        env["AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"] = runtime_url
    env.update(extra)
    return env


def client(service: str, moto_url: str):
    """A boto3 client on moto, for the tests' own checks."""
    return boto3.client(
        service, endpoint_url=moto_url, region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
    )


def run_script(python: Path, script: str, args: list[str], env: dict[str, str], timeout: float = 300):
    """Run deploy/<script> with the deploy interpreter; returns the CompletedProcess."""
    return subprocess.run(
        [str(python), str(DEPLOY / script), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _tiny_server(tiny_model_dir, tmp_path_factory, messages_api: str) -> Iterator[Server]:
    """Our real server (entrypoint + gunicorn) on the tiny model, with MESSAGES_API_ENABLED as given."""
    server = start_server(
        {"HF_MODEL_ID": str(tiny_model_dir), "MESSAGES_API_ENABLED": messages_api, "MAX_CONCURRENT_REQUESTS": "4"},
        tmp_path_factory.mktemp("deploy-logs"),
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def messages_server(tiny_model_dir, tmp_path_factory) -> Iterator[Server]:
    """MESSAGES_API_ENABLED on ("True", as the TGI snippet's bool arrives once stringified)."""
    yield from _tiny_server(tiny_model_dir, tmp_path_factory, "True")


@pytest.fixture(scope="session")
def tgi_server(tiny_server) -> Server:
    """MESSAGES_API_ENABLED off (the default): /invocations speaks TGI. The session's shared tiny server is one."""
    return tiny_server


@pytest.fixture(scope="session")
def messages_runtime(messages_server) -> Iterator[LocalRuntime]:
    runtime = start_in_thread(messages_server.url, timeout=300, quiet=True)
    yield runtime
    runtime.shutdown()


@pytest.fixture(scope="session")
def tgi_runtime(tgi_server) -> Iterator[LocalRuntime]:
    runtime = start_in_thread(tgi_server.url, timeout=300, quiet=True)
    yield runtime
    runtime.shutdown()
