"""deploy/ci_deploy.sh rehearsed end to end against stand-ins that speak the real protocols (make image-test):

build (buildah) -> deploy/push_image.sh to a local registry, ECR calls answered by moto -> deploy.py against moto
-> the pushed image pulled back from the registry and run as the endpoint's container -> the SageMaker SDK's
predict and predict_stream through deploy/local_endpoint.py -> teardown, always; and a failing smoke test that
still tears down and exits non-zero.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import boto3
import pytest

from tests.helpers import ROOT, english_words, free_port, wait_for
from tests.image.sagemaker_host import LocalHosting, Registry

IMAGE = os.environ.get("SERVE_TEST_IMAGE")
DEPLOY_PYTHON = Path(os.environ.get("DEPLOY_PYTHON", ROOT / ".venv-deploy" / "bin" / "python"))
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not IMAGE, reason="needs a built image: make image-test")]

REGION = "us-east-1"
REPOSITORY = "sagemaker-llm-serve"
ROLE = "arn:aws:iam::123456789012:role/sagemaker_execution_role"
CACHE = Path(os.environ.get("IMAGE_CACHE_DIR", Path.home() / ".cache" / "sagemaker-llm-serve" / "image"))
# Limits an operator of a small CPU instance would set, so that 2 busy cores answer within SageMaker's 60 s.
OPERATOR_ENV = "--env DEFAULT_MAX_NEW_TOKENS=32 --env MAX_TOTAL_TOKENS=1024 --env MAX_BATCH_TOTAL_TOKENS=4096"
# SM_NUM_GPUS for a host with no GPU: the server takes only positive counts, so it is sent empty (= unset, CPU).
SM_NUM_GPUS = os.environ.get("SERVE_TEST_SM_NUM_GPUS", "")


@pytest.fixture(scope="module")
def moto_url():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="module")
def sagemaker(moto_url):
    return boto3.client(
        "sagemaker",
        endpoint_url=moto_url,
        region_name=REGION,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    # A stable address: buildah remembers which layer blobs a registry already holds, so a warm push is seconds
    registry = Registry(
        CACHE / "registry",
        tmp_path_factory.mktemp("registry") / "registry.log",
        port=int(os.environ.get("SERVE_TEST_REGISTRY_PORT", "5055")),
    )
    yield registry
    registry.stop()


@pytest.fixture(scope="module")
def hosting(sagemaker, tmp_path_factory):
    hosting = LocalHosting(sagemaker, free_port(), tmp_path_factory.mktemp("endpoints"))
    hosting.start()
    yield hosting
    hosting.stop()


@pytest.fixture(scope="module")
def runtime(hosting):
    from deploy.local_endpoint import start_in_thread

    runtime = start_in_thread(f"http://127.0.0.1:{hosting.port}", timeout=300, quiet=True)
    yield runtime
    runtime.shutdown()


def aws_env(moto_url: str, **extra: str) -> dict[str, str]:
    """This process's environment with fake credentials and every AWS call sent to moto."""
    if not DEPLOY_PYTHON.exists():
        pytest.fail(f"{DEPLOY_PYTHON} is missing: make install-deploy")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION=REGION,
        AWS_MAX_ATTEMPTS="1",
        AWS_CONFIG_FILE="/nonexistent",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_ENDPOINT_URL=moto_url,
        PYTHON=str(DEPLOY_PYTHON),
    )
    env.update(extra)
    return env


def ci_deploy(moto_url, runtime, hosting, registry, **extra) -> subprocess.CompletedProcess:
    """Run deploy/ci_deploy.sh with every AWS call on moto and the image tools set for this machine."""
    env = aws_env(moto_url)
    env.update(
        AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=runtime.url,
        ROLE=ROLE,
        INSTANCE_TYPE="ml.g4dn.xlarge",  # moto's instance-type enum lacks ml.g5.*; the script's default stays
        SM_NUM_GPUS=SM_NUM_GPUS or "1",
        DEPLOY_ARGS=OPERATOR_ENV + ("" if SM_NUM_GPUS else " --env SM_NUM_GPUS="),
        INVOKE_ARGS="--max-tokens 24",
        ENDPOINT_NAME=f"rehearsal-{uuid.uuid4().hex[:8]}",
        # SageMaker marks an endpoint InService once the container answers /ping; moto does at once, so wait here
        BEFORE_SMOKE_TEST=f"curl -fsS -o /dev/null --retry 150 --retry-delay 2 --retry-all-errors "
        f"http://127.0.0.1:{hosting.port}/ping",
        CONTAINER_TOOL="buildah",
        REGISTRY=registry.host,
        TLS_VERIFY="false",
        REPOSITORY=REPOSITORY,
    )
    env.update(extra)
    started = time.monotonic()
    process = subprocess.Popen(
        ["bash", "deploy/ci_deploy.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    stderr = threading.Thread(target=lambda: setattr(process, "err_text", process.stderr.read()), daemon=True)
    stderr.start()
    lines = []
    for line in process.stdout:  # the script's steps, with the time each began
        lines.append(line)
        if line.startswith("== ci_deploy:"):
            print(f"[rehearsal] {time.monotonic() - started:6.1f} s {line.rstrip()}", flush=True)
    process.wait(60)
    stderr.join(60)
    result = subprocess.CompletedProcess(process.args, process.returncode, "".join(lines), process.err_text)
    print(f"[rehearsal] ci_deploy.sh exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result


def assert_torn_down(sagemaker, hosting, endpoint: str) -> None:
    assert not sagemaker.list_endpoints(NameContains=endpoint)["Endpoints"]
    assert not sagemaker.list_endpoint_configs(NameContains=endpoint)["EndpointConfigs"]
    assert not sagemaker.list_models(NameContains=endpoint)["Models"]
    hosted = hosting.endpoints[endpoint]
    wait_for(lambda: hosted.stopped is not None, timeout=60, interval=0.5)  # hosting sees the deletion and stops it
    assert hosted.stopped is not None and hosted.stopped[0] == 0 and hosted.stopped[1] < 30, hosted.stopped


@pytest.fixture(scope="module")
def pushed(moto_url, runtime, hosting, registry, sagemaker):
    """The passing rehearsal: build -> push -> deploy -> container from the registry -> smoke -> teardown."""
    tag = f"rehearsal-{uuid.uuid4().hex[:8]}"
    flags = subprocess.run(
        ["scripts/image/build.sh", "--print-flags"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    endpoint = f"rehearsal-{uuid.uuid4().hex[:8]}"
    result = ci_deploy(
        moto_url,
        runtime,
        hosting,
        registry,
        IMAGE_TAG=tag,
        ENDPOINT_NAME=endpoint,
        BUILD_FLAGS=f"{flags} --build-arg EMBED_MODEL=true",
    )
    image_uri = f"{registry.host}/{REPOSITORY}:{tag}"
    yield result, endpoint, image_uri
    subprocess.run(["buildah", "rmi", image_uri], capture_output=True)  # the local tag; layers stay cached


def test_build_push_deploy_smoke_teardown(pushed, registry, hosting, sagemaker, moto_url):
    result, endpoint, image_uri = pushed
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].endswith("passed")
    streamed = next(line for line in result.stdout.splitlines() if line.startswith("predict_stream ->"))
    assert "predict ->" in result.stdout and english_words(streamed) >= 5, result.stdout
    assert f"logging in to {registry.host}" in result.stderr and f"pushing {image_uri}" in result.stderr
    tag = image_uri.rsplit(":", 1)[1]
    assert tag in registry.tags(REPOSITORY)  # pushed to the registry
    ecr = boto3.client(
        "ecr", endpoint_url=moto_url, region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    assert ecr.describe_repositories(repositoryNames=[REPOSITORY])["repositories"]  # created through ECR's API
    hosted = hosting.endpoints[endpoint]
    assert hosted.image == image_uri  # the endpoint ran the pushed image, pulled back from the registry
    assert hosted.environment["MESSAGES_API_ENABLED"] == "true"  # given as a flag, stringified by deploy.py
    assert hosted.environment["SM_NUM_GPUS"] == SM_NUM_GPUS and hosted.environment["DEFAULT_MAX_NEW_TOKENS"] == "32"
    log = hosted.server.log()
    print("\n".join(f"[rehearsal] endpoint: {line}" for line in log.splitlines() if "cold start" in line))
    assert "route=/invocations" in log and "stream=True" in log
    assert not hosting.errors
    assert_torn_down(sagemaker, hosting, endpoint)


def test_failing_smoke_test_still_tears_down(pushed, moto_url, runtime, hosting, registry, sagemaker):
    _, _, image_uri = pushed
    endpoint = f"rehearsal-fail-{uuid.uuid4().hex[:8]}"
    # The endpoint speaks the Messages API; a TGI `inputs` smoke request gets a 422, so the smoke test fails.
    result = ci_deploy(
        moto_url,
        runtime,
        hosting,
        registry,
        IMAGE_URI=image_uri,
        ENDPOINT_NAME=endpoint,
        INVOKE_ARGS="--max-tokens 24 --payload inputs",
    )
    assert result.returncode != 0
    assert f"smoke test {endpoint}" in result.stdout and "ModelError" in result.stdout + result.stderr  # as meant
    assert "FAILED" in result.stdout and f"teardown {endpoint}" in result.stdout
    assert_torn_down(sagemaker, hosting, endpoint)


def test_push_image_with_podman(moto_url, registry):
    """push_image.sh with podman instead of buildah: build (cached layers), ECR repository + login on moto, push."""
    flags = subprocess.run(
        ["scripts/image/build.sh", "--print-flags"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    tag = f"podman-{uuid.uuid4().hex[:8]}"
    ecr = boto3.client(
        "ecr", endpoint_url=moto_url, region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing"
    )
    ecr.create_repository(repositoryName="llm-serve-podman")  # as a second CI run finds it
    env = aws_env(
        moto_url,
        CONTAINER_TOOL="podman",
        BUILD_FLAGS=flags,
        REGISTRY=registry.host,
        TLS_VERIFY="false",
        REPOSITORY="llm-serve-podman",
        IMAGE_TAG=tag,
    )
    result = subprocess.run(["deploy/push_image.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    image_uri = f"{registry.host}/llm-serve-podman:{tag}"
    assert result.stdout.splitlines()[-1] == image_uri and "podman build" in result.stderr
    assert "ECR repository llm-serve-podman exists" in result.stderr
    assert tag in registry.tags("llm-serve-podman")
    subprocess.run(["podman", "rmi", image_uri], capture_output=True)
