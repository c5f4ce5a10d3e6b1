"""deploy/ci_deploy.sh end to end offline: moto as AWS, deploy/local_endpoint.py as the SageMaker runtime in front
of our real server (the endpoint's container). Only environment variables point it there."""

from __future__ import annotations

import subprocess

import pytest

from deploy.local_endpoint import start_in_thread
from tests.deploy.conftest import DEPLOY, IMAGE_URI, INSTANCE_TYPE, aws_env, client
from tests.deploy.test_deploy_scripts import create_role, scaling_state
from tests.helpers import free_port

pytestmark = pytest.mark.e2e


def ci_deploy(deploy_python, moto_url: str, runtime_url: str, **extra: str) -> subprocess.CompletedProcess:
    settings = {
        "IMAGE_URI": IMAGE_URI,
        "ENDPOINT_NAME": "llm-ci",
        "PYTHON": str(deploy_python),
        "INSTANCE_TYPE": INSTANCE_TYPE,
        "DEPLOY_ARGS": "--max-instances 2",
        "INVOKE_ARGS": "--max-tokens 16",
    }
    env = aws_env(moto_url, runtime_url, **{**settings, **extra})
    return subprocess.run(["bash", str(DEPLOY / "ci_deploy.sh")], env=env, capture_output=True, text=True, timeout=600)


def assert_torn_down(moto_url: str) -> None:
    sm = client("sagemaker", moto_url)
    assert sm.list_endpoints()["Endpoints"] == [] and sm.list_models()["Models"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert scaling_state(moto_url) == ([], [])


def test_ci_deploy_deploys_smoke_tests_and_tears_down(deploy_python, aws, messages_runtime):
    create_role(aws)
    result = ci_deploy(deploy_python, aws, messages_runtime.url)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for line in (
        "deploy 123456789012.dkr.ecr.us-east-1.amazonaws.com/sagemaker-llm-serve:test as llm-ci",
        "endpoint llm-ci is InService",
        "autoscaling endpoint/llm-ci/variant/AllTraffic",
        "predict ok",
        "predict_stream ok",
        "teardown llm-ci",
        "deleted endpoint llm-ci",
        "ci_deploy: passed",
    ):
        assert line in output
    assert '"object": "chat.completion"' in result.stdout
    assert_torn_down(aws)


def test_ci_deploy_tgi_payload_when_messages_api_is_off(deploy_python, aws, tgi_runtime):
    create_role(aws)
    result = ci_deploy(deploy_python, aws, tgi_runtime.url, MESSAGES_API_ENABLED="false", SM_NUM_GPUS="0")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "smoke test llm-ci (inputs)" in output and '"generated_text"' in result.stdout
    assert 'container env: {"MESSAGES_API_ENABLED": "false"}' in output  # SM_NUM_GPUS=0: unset, for CPU hosts
    assert_torn_down(aws)


def test_failing_smoke_test_still_tears_down_and_fails(deploy_python, aws):
    """The endpoint's container is down: invoke.py gets a ModelError, the trap tears down, the exit is non-zero."""
    create_role(aws)
    dead = start_in_thread(f"http://127.0.0.1:{free_port()}", quiet=True)
    try:
        result = ci_deploy(deploy_python, aws, dead.url)
    finally:
        dead.shutdown()
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert "predict failed" in output and "could not reach the model container" in output
    assert "teardown llm-ci" in output and "ci_deploy: FAILED" in output
    assert_torn_down(aws)


def test_failing_deploy_tears_down_what_was_created(deploy_python, aws):
    """No instance-type override: moto refuses ml.g5.2xlarge after the model exists; teardown removes the model."""
    create_role(aws)
    result = ci_deploy(deploy_python, aws, "http://127.0.0.1:9", INSTANCE_TYPE="ml.g5.2xlarge")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "deploy failed" in output and "smoke test" not in output and "teardown llm-ci" in output
    assert_torn_down(aws)


def test_cancelled_run_tears_down(deploy_python, aws):
    """A CI cancel (SIGTERM to the script after the deploy) still runs the teardown, and the exit says so."""
    create_role(aws)
    result = ci_deploy(deploy_python, aws, "http://127.0.0.1:9", BEFORE_SMOKE_TEST="kill -TERM $PPID; sleep 2")
    output = result.stdout + result.stderr
    assert result.returncode == 143, output[-4000:]
    assert "endpoint llm-ci is InService" in output and "== ci_deploy: smoke test" not in output
    assert "teardown llm-ci" in output and "ci_deploy: FAILED (exit 143)" in output
    assert_torn_down(aws)


def test_failed_push_stops_before_deploying(deploy_python, aws):
    """Without IMAGE_URI the image is pushed first; when that fails nothing is deployed and the exit is non-zero."""
    result = ci_deploy(deploy_python, aws, "http://127.0.0.1:9", IMAGE_URI="", CONTAINER_TOOL="no-such-tool")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert "push image" in output and "== ci_deploy: deploy" not in output and "teardown" not in output
    assert client("sagemaker", aws).list_models()["Models"] == []
