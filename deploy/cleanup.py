#!/usr/bin/env python3
"""Delete what deploy.py created: the scaling policy and target, the endpoint, its endpoint config and model.

Idempotent: what is already gone is reported and skipped, so running it twice (or after a failed deploy that
created only the model) succeeds. SageMaker refuses to delete an endpoint while it is Creating or Updating
(a deploy cancelled half way): that is waited out first. Names are found from the endpoint when it still exists;
otherwise deploy.py's convention (model and endpoint config named like the endpoint) is used.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable

import botocore.exceptions

from common import (
    DEFAULT_VARIANT,
    SCALABLE_DIMENSION,
    boto_session,
    is_missing,
    log,
    scaling_resource_id,
    setup_logging,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--endpoint-name", default=os.environ.get("ENDPOINT_NAME"), help="endpoint to delete (default: $ENDPOINT_NAME)"
    )
    parser.add_argument("--region", help="AWS region (default: AWS_REGION / AWS_DEFAULT_REGION)")
    parser.add_argument(
        "--wait-minutes",
        type=float,
        default=60,
        help="how long to wait for a Creating/Updating endpoint to become deletable (default 60)",
    )
    parser.add_argument("--poll-seconds", type=float, default=30, help="status poll interval (default 30)")
    args = parser.parse_args(argv)
    if not args.endpoint_name:
        parser.error("--endpoint-name (or ENDPOINT_NAME) is required")
    return args


def discover(sm, name: str) -> tuple[str, list[str], list[str]]:
    """(endpoint config, model names, variant names) of endpoint ``name``, falling back to deploy.py's names."""
    config = name
    try:
        config = sm.describe_endpoint(EndpointName=name)["EndpointConfigName"]
    except botocore.exceptions.ClientError as error:
        if not is_missing(error):
            raise
    try:
        variants = sm.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"]
        return config, sorted({v["ModelName"] for v in variants}), [v["VariantName"] for v in variants]
    except botocore.exceptions.ClientError as error:
        if not is_missing(error):
            raise
    return config, [name], [DEFAULT_VARIANT]


BUSY = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting")


def wait_until_deletable(sm, name: str, minutes: float, poll: float) -> None:
    """Wait while the endpoint is in a state DeleteEndpoint refuses (or is already being deleted)."""
    deadline = time.monotonic() + minutes * 60
    while True:
        try:
            status = sm.describe_endpoint(EndpointName=name)["EndpointStatus"]
        except botocore.exceptions.ClientError as error:
            if is_missing(error):
                return
            raise
        if status not in BUSY or time.monotonic() > deadline:
            return
        log.info("endpoint %s is %s; checking again in %.0f s before deleting it", name, status, poll)
        time.sleep(poll)


def delete_endpoint(sm, name: str, args: argparse.Namespace) -> None:
    wait_until_deletable(sm, name, args.wait_minutes, args.poll_seconds)
    sm.delete_endpoint(EndpointName=name)


def attempt(what: str, call: Callable[[], object]) -> bool:
    """Run one deletion; missing resources count as done. Returns False on any other error."""
    try:
        call()
        log.info("deleted %s", what)
    except botocore.exceptions.ClientError as error:
        if not is_missing(error):
            log.error("could not delete %s: %s", what, error)
            return False
        log.info("%s: already gone", what)
    return True


def scaling_steps(scaling, name: str, variants: list[str]) -> list[tuple[str, Callable[[], object]]]:
    """Deletion steps for the scaling policies and scalable target of each variant."""
    steps: list[tuple[str, Callable[[], object]]] = []
    for variant in variants:
        resource = scaling_resource_id(name, variant)
        ids = {"ServiceNamespace": "sagemaker", "ResourceId": resource, "ScalableDimension": SCALABLE_DIMENSION}
        policies = scaling.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)
        for policy in policies["ScalingPolicies"]:
            policy_name = policy["PolicyName"]
            steps.append(
                (
                    f"scaling policy {policy_name} ({resource})",
                    lambda ids=ids, p=policy_name: scaling.delete_scaling_policy(PolicyName=p, **ids),
                )
            )
        steps.append((f"scalable target {resource}", lambda ids=ids: scaling.deregister_scalable_target(**ids)))
    return steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    session = boto_session(args.region)
    sm = session.client("sagemaker")
    name = args.endpoint_name
    config, models, variants = discover(sm, name)
    steps = scaling_steps(session.client("application-autoscaling"), name, variants)
    steps.append((f"endpoint {name}", lambda: delete_endpoint(sm, name, args)))
    steps.append((f"endpoint config {config}", lambda: sm.delete_endpoint_config(EndpointConfigName=config)))
    steps += [(f"model {model}", lambda m=model: sm.delete_model(ModelName=m)) for model in models]
    ok = all([attempt(what, call) for what, call in steps])  # a list: every step runs even after a failure
    print(f"cleanup of {name}: {'done' if ok else 'INCOMPLETE (see errors above)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
