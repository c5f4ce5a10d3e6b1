#!/usr/bin/env python3
"""Deploy the serving image to a SageMaker real-time endpoint, the way users do it with the SDK v2:

    HuggingFaceModel(image_uri, env, role).deploy(initial_instance_count, instance_type,
                                                  container_startup_health_check_timeout)

env values are stringified first (the SageMaker API takes only strings; ``MESSAGES_API_ENABLED: True`` is a bool
in the TGI docs' snippet). Optional autoscaling registers the variant with Application Auto Scaling and tracks
``SageMakerVariantInvocationsPerInstance`` (or, with ``--scale-on kv-cache|queue``, the server's own EMF metrics
``KVCacheUsage`` / ``QueueLength``, which it then logs for CloudWatch).
Prints the endpoint name and a predictor snippet to paste.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import botocore.exceptions

from common import (
    DEFAULT_VARIANT,
    SCALABLE_DIMENSION,
    SCALING_POLICY_NAME,
    boto_session,
    code_bucket,
    log,
    parse_env_pairs,
    predictor_snippet,
    resolve_role,
    sagemaker_session,
    scaling_resource_id,
    setup_logging,
    stringify_env,
)


EMF_NAMESPACE = "sagemaker-llm-serve"  # the server's CLOUDWATCH_NAMESPACE default (serve/sagemaker/emf.py)
SCALE_ON = {  # --scale-on: the EMF metric, its unit and the default target
    "invocations": ("SageMakerVariantInvocationsPerInstance", None, 10.0),
    "kv-cache": ("KVCacheUsage", "Percent", 70.0),
    "queue": ("QueueLength", "Count", 4.0),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_endpoint_arguments(parser)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="extra container env")
    add_scaling_arguments(parser)
    parser.add_argument("--no-wait", dest="wait", action="store_false", help="return once creation has started")
    parser.add_argument("--wait-minutes", type=int, default=30, help="how long to wait for InService (default 30)")
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        args.extra_env = parse_env_pairs(args.env)
    except ValueError as error:
        parser.error(str(error))
    return args


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The image, the model and what the container is told about it."""
    parser.add_argument("--image-uri", default=os.environ.get("IMAGE_URI"), help="ECR image (default: $IMAGE_URI)")
    parser.add_argument(
        "--model-id",
        help="HF_MODEL_ID: hub id or a path inside the container (unset: the model "
        "in /opt/ml/model from --model-data, else the image's embedded default)",
    )
    parser.add_argument("--revision", help="HF_MODEL_REVISION")
    parser.add_argument("--model-data", help="s3://.../model.tar.gz unpacked by SageMaker into /opt/ml/model")
    parser.add_argument(
        "--num-gpus", type=int, default=1, help="SM_NUM_GPUS (default 1; 0 leaves it unset, for CPU instance types)"
    )
    parser.add_argument(
        "--messages-api",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="MESSAGES_API_ENABLED: /invocations takes OpenAI messages (default on)",
    )


def add_endpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The instances, the role, the endpoint's name and start-up, the region."""
    parser.add_argument("--instance-type", default="ml.g5.2xlarge", help="default ml.g5.2xlarge")
    parser.add_argument("--instance-count", type=int, default=1, help="initial instances (default 1)")
    parser.add_argument(
        "--role",
        help="execution role ARN (default: sagemaker.get_execution_role(), "
        "else the IAM role 'sagemaker_execution_role')",
    )
    parser.add_argument(
        "--endpoint-name",
        default=os.environ.get("ENDPOINT_NAME"),
        help="endpoint name, also used for its model and endpoint config (default: generated)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=int,
        default=300,
        help="container_startup_health_check_timeout in seconds (default 300)",
    )
    parser.add_argument(
        "--inference-ami-version",
        help="e.g. al2-ami-sagemaker-inference-gpu-3-1 (a current NVIDIA driver); default: SageMaker's choice",
    )
    parser.add_argument("--region", help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION)")


def add_scaling_arguments(parser: argparse.ArgumentParser) -> None:
    """Autoscaling: the instance bounds, the metric and its target."""
    parser.add_argument("--min-instances", type=int, help="autoscaling: minimum instances")
    parser.add_argument("--max-instances", type=int, help="autoscaling: maximum instances (turns autoscaling on)")
    parser.add_argument(
        "--target-invocations",
        type=float,
        default=10.0,
        help="autoscaling: target invocations per instance per minute (default 10)",
    )
    parser.add_argument(
        "--scale-on",
        choices=sorted(SCALE_ON),
        default="invocations",
        help="autoscaling metric: invocations per instance (SageMaker's own), or the server's EMF "
        "metrics kv-cache (KVCacheUsage, %%) or queue (QueueLength); default invocations",
    )
    parser.add_argument(
        "--target",
        type=float,
        help="autoscaling target for --scale-on kv-cache (default 70 %%) or queue (default 4 waiting)",
    )


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse combinations that cannot work (parser.error exits with the usage)."""
    if not args.image_uri:
        parser.error("--image-uri (or IMAGE_URI) is required")
    if args.max_instances is not None and (args.min_instances or args.instance_count) > args.max_instances:
        parser.error("--min-instances must not exceed --max-instances")
    if args.scale_on != "invocations" and args.max_instances is None:
        parser.error("--scale-on needs --max-instances (autoscaling is off without it)")
    if args.max_instances is not None and not args.wait:
        parser.error("autoscaling needs the endpoint InService: drop --no-wait")


def container_env(args: argparse.Namespace) -> dict[str, object]:
    """The env dict as a user writes it (a bool included); stringify_env() turns it into what the API takes."""
    hub: dict[str, object] = {"MESSAGES_API_ENABLED": args.messages_api}
    if args.num_gpus > 0:
        hub["SM_NUM_GPUS"] = json.dumps(args.num_gpus)
    if args.model_id:
        hub["HF_MODEL_ID"] = args.model_id
    if args.revision:
        hub["HF_MODEL_REVISION"] = args.revision
    hub.update(args.extra_env)
    return hub


def metric_env(args: argparse.Namespace, name: str) -> dict[str, object]:
    """For scaling on the server's EMF metrics: turn them on, and name the dimensions the policy tracks."""
    if args.scale_on == "invocations":
        return {}
    return {
        "CLOUDWATCH_METRICS": True,
        "CLOUDWATCH_NAMESPACE": EMF_NAMESPACE,
        "SAGEMAKER_ENDPOINT_NAME": name,
        "SAGEMAKER_VARIANT_NAME": DEFAULT_VARIANT,
    }


def deploy_model(args: argparse.Namespace, sm_session, role: str) -> str:
    """Create model, endpoint config and endpoint through HuggingFaceModel.deploy; returns the endpoint name."""
    from sagemaker.huggingface import HuggingFaceModel

    name = args.endpoint_name or f"llm-serve-{time.strftime('%Y%m%d-%H%M%S')}"
    # We upload no inference code, but the SDK names a code location anyway; giving it one keeps it from creating
    # its default bucket (through an STS endpoint no override reaches) just for that.
    env = stringify_env({**container_env(args), **metric_env(args, name)})
    log.info("container env: %s", json.dumps(env))
    model = HuggingFaceModel(
        code_location=f"s3://{code_bucket(sm_session.boto_session)}/{name}",
        image_uri=args.image_uri,
        env=env,
        role=role,
        model_data=args.model_data,
        name=name,
        sagemaker_session=sm_session,
    )
    extra = {"inference_ami_version": args.inference_ami_version} if args.inference_ami_version else {}
    log.info("creating model, endpoint config and endpoint %s (%s x%d)", name, args.instance_type, args.instance_count)
    model.deploy(
        initial_instance_count=args.instance_count,
        instance_type=args.instance_type,
        endpoint_name=name,
        container_startup_health_check_timeout=args.startup_timeout,
        wait=False,
        **extra,
    )
    return name


def wait_in_service(sm_client, name: str, minutes: int) -> None:
    """Poll DescribeEndpoint (first look at once, then every 30 s) until InService; exit on Failed."""
    deadline = time.monotonic() + minutes * 60
    while True:
        desc = sm_client.describe_endpoint(EndpointName=name)
        status = desc["EndpointStatus"]
        if status == "InService":
            log.info("endpoint %s is InService", name)
            return
        if status in ("Failed", "OutOfService", "RollingBack"):
            raise SystemExit(f"endpoint {name} is {status}: {desc.get('FailureReason', 'no reason given')}")
        if time.monotonic() > deadline:
            raise SystemExit(f"endpoint {name} still {status} after {minutes} min")
        log.info("endpoint %s is %s; waiting", name, status)
        time.sleep(30)


def enable_autoscaling(session, name: str, args: argparse.Namespace) -> None:
    """Register the variant with Application Auto Scaling and track invocations per instance."""
    client = session.client("application-autoscaling")
    resource_id = scaling_resource_id(name, DEFAULT_VARIANT)
    low = args.min_instances if args.min_instances is not None else args.instance_count
    client.register_scalable_target(
        ServiceNamespace="sagemaker",
        ResourceId=resource_id,
        ScalableDimension=SCALABLE_DIMENSION,
        MinCapacity=low,
        MaxCapacity=args.max_instances,
    )
    policy_name, target, metric = tracked_metric(args, name)
    client.put_scaling_policy(
        PolicyName=policy_name,
        ServiceNamespace="sagemaker",
        ResourceId=resource_id,
        ScalableDimension=SCALABLE_DIMENSION,
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration={
            "TargetValue": target,
            **metric,
            "ScaleInCooldown": 300,
            "ScaleOutCooldown": 60,
        },
    )
    log.info(
        "autoscaling %s: %d..%d instances on %s, target %g", resource_id, low, args.max_instances, args.scale_on, target
    )


def tracked_metric(args: argparse.Namespace, name: str) -> tuple[str, float, dict[str, object]]:
    """(policy name, target value, metric specification) for --scale-on."""
    if args.scale_on == "invocations":
        spec = {"PredefinedMetricSpecification": {"PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"}}
        return SCALING_POLICY_NAME, args.target if args.target is not None else args.target_invocations, spec
    metric_name, unit, default = SCALE_ON[args.scale_on]
    dimensions = [{"Name": "EndpointName", "Value": name}, {"Name": "VariantName", "Value": DEFAULT_VARIANT}]
    spec = {
        "CustomizedMetricSpecification": {
            "MetricName": metric_name,
            "Namespace": EMF_NAMESPACE,
            "Dimensions": dimensions,
            "Statistic": "Average",
            "Unit": unit,
        }
    }
    return f"{args.scale_on}-target-tracking", args.target if args.target is not None else default, spec


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    session = boto_session(args.region)
    sm_session = sagemaker_session(session)
    role = resolve_role(args.role, sm_session)
    log.info("execution role: %s", role)
    try:
        name = deploy_model(args, sm_session, role)
        if args.wait:
            wait_in_service(sm_session.sagemaker_client, name, args.wait_minutes)
        if args.max_instances is not None:
            enable_autoscaling(session, name, args)
    except botocore.exceptions.ClientError as error:
        log.error("deploy failed: %s", error)
        log.error(
            "remove what was created with: python deploy/cleanup.py --endpoint-name %s --region %s",
            args.endpoint_name or "<name above>",
            session.region_name,
        )
        return 1
    print(f"endpoint: {name}")
    print("\n# paste into Python:\n" + predictor_snippet(name, session.region_name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
