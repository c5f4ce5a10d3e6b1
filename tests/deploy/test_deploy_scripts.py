"""deploy.py and cleanup.py against a moto server: what they create and delete, through the real SageMaker SDK v2."""

from __future__ import annotations

import json
import subprocess

import pytest

from deploy.common import stringify_env
from tests.deploy.conftest import DEPLOY, IMAGE_URI, INSTANCE_TYPE, REGION, aws_env, client, run_script

ACCOUNT = "123456789012"  # moto's account

ROLE_TRUST = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}
        ],
    }
)


def create_role(moto_url: str, name: str = "sagemaker_execution_role") -> str:
    return client("iam", moto_url).create_role(RoleName=name, AssumeRolePolicyDocument=ROLE_TRUST)["Role"]["Arn"]


def deploy(deploy_python, moto_url: str, *args: str):
    base = ["--image-uri", IMAGE_URI, "--instance-type", INSTANCE_TYPE, "--endpoint-name", "llm-test"]
    return run_script(deploy_python, "deploy.py", [*base, *args], aws_env(moto_url))


def scaling_state(moto_url: str) -> tuple[list, list]:
    scaling = client("application-autoscaling", moto_url)
    return (
        scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"],
        scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"],
    )


def test_stringify_env_accepts_the_tgi_snippets_types():
    hub = {
        "HF_MODEL_ID": "HuggingFaceH4/zephyr-7b-beta",
        "SM_NUM_GPUS": json.dumps(1),
        "MESSAGES_API_ENABLED": True,
        "MAX_TOTAL_TOKENS": 4096,
        "OFF": False,
        "UNSET": None,
    }
    assert stringify_env(hub) == {
        "HF_MODEL_ID": "HuggingFaceH4/zephyr-7b-beta",
        "SM_NUM_GPUS": "1",
        "MESSAGES_API_ENABLED": "true",
        "MAX_TOTAL_TOKENS": "4096",
        "OFF": "false",
    }


@pytest.mark.parametrize("script", ["deploy.py", "invoke.py", "cleanup.py"])
def test_help(deploy_python, script):
    result = run_script(deploy_python, script, ["--help"], aws_env("http://127.0.0.1:9"))
    assert result.returncode == 0, result.stderr
    assert "--endpoint-name" in result.stdout and "--region" in result.stdout


def test_deploy_creates_model_config_endpoint_and_scaling_then_cleanup_removes_them(deploy_python, aws):
    role = create_role(aws)
    result = deploy(
        deploy_python,
        aws,
        "--model-id",
        "HuggingFaceH4/zephyr-7b-beta",
        "--revision",
        "main",
        "--env",
        "MAX_TOTAL_TOKENS=4096",
        "--max-instances",
        "3",
        "--min-instances",
        "1",
        "--target-invocations",
        "25",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "endpoint: llm-test" in result.stdout and "HuggingFacePredictor(endpoint_name='llm-test'" in result.stdout
    sm = client("sagemaker", aws)
    model = sm.describe_model(ModelName="llm-test")
    env = model["PrimaryContainer"]["Environment"]
    assert all(isinstance(value, str) for value in env.values())
    assert env["MESSAGES_API_ENABLED"] == "true" and env["SM_NUM_GPUS"] == "1"
    assert env["HF_MODEL_ID"] == "HuggingFaceH4/zephyr-7b-beta" and env["MAX_TOTAL_TOKENS"] == "4096"
    assert model["PrimaryContainer"]["Image"] == IMAGE_URI and model["ExecutionRoleArn"] == role
    (variant,) = sm.describe_endpoint_config(EndpointConfigName="llm-test")["ProductionVariants"]
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 300
    assert variant["InstanceType"] == INSTANCE_TYPE and variant["InitialInstanceCount"] == 1
    assert sm.describe_endpoint(EndpointName="llm-test")["EndpointStatus"] == "InService"
    targets, policies = scaling_state(aws)
    assert [(t["ResourceId"], t["MinCapacity"], t["MaxCapacity"]) for t in targets] == [
        ("endpoint/llm-test/variant/AllTraffic", 1, 3)
    ]
    tracking = policies[0]["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 25.0
    assert tracking["PredefinedMetricSpecification"]["PredefinedMetricType"] == "SageMakerVariantInvocationsPerInstance"

    for attempt in range(2):  # idempotent: the second run finds nothing and still succeeds
        result = run_script(deploy_python, "cleanup.py", ["--endpoint-name", "llm-test"], aws_env(aws))
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("already gone" in result.stderr) == (attempt == 1)
    assert sm.list_endpoints()["Endpoints"] == [] and sm.list_models()["Models"] == []
    assert sm.list_endpoint_configs()["EndpointConfigs"] == []
    assert scaling_state(aws) == ([], [])


def test_explicit_role_and_options(deploy_python, aws):
    arn = create_role(aws, "my-deploy-role")
    result = deploy(
        deploy_python,
        aws,
        "--role",
        arn,
        "--no-messages-api",
        "--num-gpus",
        "4",
        "--instance-count",
        "2",
        "--startup-timeout",
        "600",
        "--inference-ami-version",
        "al2-ami-sagemaker-inference-gpu-3-1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sm = client("sagemaker", aws)
    model = sm.describe_model(ModelName="llm-test")
    assert model["ExecutionRoleArn"] == arn
    assert model["PrimaryContainer"]["Environment"]["MESSAGES_API_ENABLED"] == "false"
    assert model["PrimaryContainer"]["Environment"]["SM_NUM_GPUS"] == "4"
    assert "HF_MODEL_ID" not in model["PrimaryContainer"]["Environment"]
    (variant,) = sm.describe_endpoint_config(EndpointConfigName="llm-test")["ProductionVariants"]
    assert variant["InitialInstanceCount"] == 2 and variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 600
    assert variant["InferenceAmiVersion"] == "al2-ami-sagemaker-inference-gpu-3-1"
    assert scaling_state(aws) == ([], [])  # no autoscaling unless asked


def test_without_any_role_deploy_says_how_to_fix_it(deploy_python, aws):
    result = deploy(deploy_python, aws)
    assert result.returncode != 0
    assert "pass --role ARN or create the IAM role 'sagemaker_execution_role'" in result.stderr
    assert client("sagemaker", aws).list_models()["Models"] == []


def test_bad_flags_are_refused_before_any_call(deploy_python, aws):
    result = deploy(deploy_python, aws, "--env", "NOEQUALS")
    assert result.returncode == 2 and "--env expects KEY=VALUE" in result.stderr
    result = deploy(deploy_python, aws, "--max-instances", "1", "--min-instances", "2")
    assert result.returncode == 2 and "must not exceed" in result.stderr
    result = run_script(deploy_python, "deploy.py", ["--endpoint-name", "x"], aws_env(aws))
    assert result.returncode == 2 and "--image-uri (or IMAGE_URI) is required" in result.stderr


def test_half_failed_deploy_is_cleaned_up(deploy_python, aws):
    """moto refuses the default ml.g5.2xlarge after the model exists: deploy fails, cleanup still removes the model."""
    create_role(aws)
    result = run_script(
        deploy_python, "deploy.py", ["--image-uri", IMAGE_URI, "--endpoint-name", "llm-half"], aws_env(aws)
    )
    assert result.returncode == 1 and "deploy failed" in result.stderr and "ml.g5.2xlarge" in result.stderr
    assert "cleanup.py --endpoint-name llm-half" in result.stderr
    sm = client("sagemaker", aws)
    assert [m["ModelName"] for m in sm.list_models()["Models"]] == ["llm-half"]
    result = run_script(deploy_python, "cleanup.py", ["--endpoint-name", "llm-half"], aws_env(aws))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "endpoint llm-half: already gone" in result.stderr and "deleted model llm-half" in result.stderr
    assert sm.list_models()["Models"] == []


def test_cleanup_waits_until_a_creating_endpoint_can_be_deleted(deploy_python, aws):
    """SageMaker refuses DeleteEndpoint while Creating (a deploy cancelled half way): cleanup waits, then deletes."""
    from moto.sagemaker.models import sagemaker_backends

    create_role(aws)
    assert deploy(deploy_python, aws, "--no-wait").returncode == 0
    endpoint = sagemaker_backends[ACCOUNT][REGION].endpoints["llm-test"]
    endpoint.endpoint_status = "Creating"
    process = subprocess.Popen(
        [
            str(deploy_python),
            str(DEPLOY / "cleanup.py"),
            "--endpoint-name",
            "llm-test",
            "--poll-seconds",
            "0.5",
            "--wait-minutes",
            "2",
        ],
        env=aws_env(aws),
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = []
    for line in process.stderr:  # the endpoint leaves Creating only once cleanup has seen it there
        seen.append(line)
        if "endpoint llm-test is Creating; checking again" in line:
            endpoint.endpoint_status = "InService"
    log = "".join(seen)
    assert process.wait(120) == 0, log
    assert "is Creating; checking again" in log and "deleted endpoint llm-test" in log
    assert client("sagemaker", aws).list_endpoints()["Endpoints"] == []
