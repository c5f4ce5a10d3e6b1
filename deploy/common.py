"""Helpers shared by deploy.py, invoke.py and cleanup.py: sessions, role, env stringification, names."""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any, Mapping

# Set before `import sagemaker` anywhere in the deploy scripts: SDK v2 otherwise warns about 3.x on import.
os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")

import boto3  # noqa: E402
import botocore.exceptions  # noqa: E402

log = logging.getLogger("deploy")

DEFAULT_ROLE_NAME = "sagemaker_execution_role"
DEFAULT_VARIANT = "AllTraffic"
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
SCALING_POLICY_NAME = "invocations-per-instance"

# The request from the TGI Messages API page, as a user sends it to a deployed endpoint.
SEED_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is deep learning?"},
]


def setup_logging(verbose: bool = False) -> None:
    """Log lines go to stderr so that stdout stays for what a caller may parse."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("botocore", "urllib3", "sagemaker.config"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def stringify_env(env: Mapping[str, Any]) -> dict[str, str]:
    """SageMaker accepts only string env values: ``True`` → ``"true"``, ``1`` → ``"1"``, dicts → JSON."""
    out: dict[str, str] = {}
    for key, value in env.items():
        if value is None:
            continue
        out[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return out


def parse_env_pairs(pairs: list[str]) -> dict[str, str]:
    """``["K=V", ...]`` → ``{"K": "V"}``; raises ValueError naming a pair without ``=``."""
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def boto_session(region: str | None) -> boto3.Session:
    """A boto3 session in ``region`` (or the default chain: AWS_REGION, AWS_DEFAULT_REGION, config)."""
    region = region or os.environ.get("AWS_REGION")  # boto3 itself reads only AWS_DEFAULT_REGION
    session = boto3.Session(region_name=region) if region else boto3.Session()
    if not session.region_name:
        raise SystemExit("no AWS region: pass --region or set AWS_REGION")
    return session


def sagemaker_session(session: boto3.Session):
    """A SageMaker SDK v2 session over ``session`` (its clients honour AWS_ENDPOINT_URL_* overrides)."""
    import sagemaker

    return sagemaker.Session(boto_session=session)


def code_bucket(session: boto3.Session) -> str:
    """The SDK's default bucket name, ``sagemaker-{region}-{account}``, found through an STS client that honours
    AWS_ENDPOINT_URL (the SDK's own lookup pins the public STS endpoint)."""
    account = session.client("sts").get_caller_identity()["Account"]
    return f"sagemaker-{session.region_name}-{account}"


def resolve_role(explicit: str | None, sm_session) -> str:
    """``--role`` if given, else ``sagemaker.get_execution_role()``, else the IAM role ``sagemaker_execution_role``."""
    if explicit:
        return explicit
    import sagemaker

    try:
        return sagemaker.get_execution_role(sm_session)
    except ValueError as error:  # the caller is a user, not a role (outside SageMaker notebooks)
        log.info("%s; looking up the IAM role %r", error, DEFAULT_ROLE_NAME)
    except botocore.exceptions.BotoCoreError as error:  # STS unreachable (e.g. an offline rehearsal)
        log.info("could not ask STS who we are (%s); looking up the IAM role %r", error, DEFAULT_ROLE_NAME)
    iam = sm_session.boto_session.client("iam")
    try:
        return iam.get_role(RoleName=DEFAULT_ROLE_NAME)["Role"]["Arn"]
    except botocore.exceptions.ClientError as error:
        raise SystemExit(f"no execution role: pass --role ARN or create the IAM role {DEFAULT_ROLE_NAME!r} ({error})")


def scaling_resource_id(endpoint_name: str, variant: str = DEFAULT_VARIANT) -> str:
    """The Application Auto Scaling resource id of an endpoint's production variant."""
    return f"endpoint/{endpoint_name}/variant/{variant}"


def is_missing(error: botocore.exceptions.ClientError) -> bool:
    """Whether a SageMaker / Auto Scaling error says the resource does not exist (so there is nothing to do)."""
    code = error.response.get("Error", {}).get("Code", "")
    message = error.response.get("Error", {}).get("Message", "").lower()
    if code in ("ResourceNotFound", "ObjectNotFoundException", "NoSuchEntity", "ResourceNotFoundException"):
        return True
    return code == "ValidationException" and any(
        phrase in message for phrase in ("could not find", "does not exist", "not found", "no scalable target")
    )


def predictor_snippet(endpoint_name: str, region: str) -> str:
    """Python the user can paste to talk to the endpoint with the SageMaker SDK v2."""
    return f"""import boto3, sagemaker
from sagemaker.huggingface import HuggingFacePredictor

session = sagemaker.Session(boto_session=boto3.Session(region_name={region!r}))
predictor = HuggingFacePredictor(endpoint_name={endpoint_name!r}, sagemaker_session=session)
print(predictor.predict({{"messages": {json.dumps(SEED_MESSAGES)}}}))
# when done: python deploy/cleanup.py --endpoint-name {endpoint_name} --region {region}"""
