"""deploy.py --scale-on: a target-tracking policy on the server's EMF metrics (moto), and the env that emits them."""

import pytest

from tests.deploy.conftest import client, run_script, aws_env
from tests.deploy.test_deploy_scripts import create_role, deploy, scaling_state

DIMENSIONS = [{"Name": "EndpointName", "Value": "llm-test"}, {"Name": "VariantName", "Value": "AllTraffic"}]


@pytest.mark.parametrize(
    "scale_on, extra, metric, unit, target",
    [
        ("kv-cache", [], "KVCacheUsage", "Percent", 70.0),
        ("queue", ["--target", "2.5"], "QueueLength", "Count", 2.5),
    ],
)
def test_scale_on_an_emf_metric(deploy_python, aws, scale_on, extra, metric, unit, target):
    create_role(aws)
    result = deploy(deploy_python, aws, "--max-instances", "4", "--scale-on", scale_on, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    env = client("sagemaker", aws).describe_model(ModelName="llm-test")["PrimaryContainer"]["Environment"]
    assert env["CLOUDWATCH_METRICS"] == "true" and env["CLOUDWATCH_NAMESPACE"] == "sagemaker-llm-serve"
    assert (env["SAGEMAKER_ENDPOINT_NAME"], env["SAGEMAKER_VARIANT_NAME"]) == ("llm-test", "AllTraffic")
    targets, policies = scaling_state(aws)
    assert [(t["ResourceId"], t["MaxCapacity"]) for t in targets] == [("endpoint/llm-test/variant/AllTraffic", 4)]
    (policy,) = policies
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert policy["PolicyName"] == f"{scale_on}-target-tracking" and tracking["TargetValue"] == target
    assert tracking["CustomizedMetricSpecification"] == {
        "MetricName": metric,
        "Namespace": "sagemaker-llm-serve",
        "Dimensions": DIMENSIONS,
        "Statistic": "Average",
        "Unit": unit,
    }
    cleanup = run_script(deploy_python, "cleanup.py", ["--endpoint-name", "llm-test"], aws_env(aws))
    assert cleanup.returncode == 0, cleanup.stderr[-3000:]
    assert scaling_state(aws) == ([], [])


def test_scale_on_without_max_instances_is_refused(deploy_python, aws):
    result = deploy(deploy_python, aws, "--scale-on", "queue")
    assert result.returncode == 2 and "--scale-on needs --max-instances" in result.stderr
