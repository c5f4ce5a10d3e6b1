#!/usr/bin/env python3
"""The ECR calls behind deploy/push_image.sh, through boto3 (so AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_ECR apply).

python deploy/ecr.py repository NAME   create the repository if missing; print its URI
python deploy/ecr.py login             print "REGISTRY PASSWORD" for `<tool> login -u AWS --password-stdin`
"""

from __future__ import annotations

import argparse
import base64
import sys
from urllib.parse import urlsplit

import boto3


def ensure_repository(client, name: str) -> str:
    """The repository's URI, creating it (scan on push, mutable tags) when it does not exist."""
    try:
        found = client.describe_repositories(repositoryNames=[name])["repositories"][0]
        print(f"ECR repository {name} exists", file=sys.stderr)
        return found["repositoryUri"]
    except client.exceptions.RepositoryNotFoundException:
        created = client.create_repository(repositoryName=name, imageScanningConfiguration={"scanOnPush": True})
        print(f"ECR repository {name} created", file=sys.stderr)
        return created["repository"]["repositoryUri"]


def login(client) -> tuple[str, str]:
    """(registry host, password) from GetAuthorizationToken; the user name is always AWS."""
    data = client.get_authorization_token()["authorizationData"][0]
    user, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    if user != "AWS":
        raise SystemExit(f"unexpected ECR token user {user!r}")
    return urlsplit(data["proxyEndpoint"]).netloc, password


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--region", help="AWS region (default: the AWS_REGION / profile region)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("repository", help="create the repository if missing; print its URI").add_argument("name")
    sub.add_parser("login", help='print "REGISTRY PASSWORD"')
    args = parser.parse_args()
    client = boto3.client("ecr", region_name=args.region)
    if args.command == "repository":
        print(ensure_repository(client, args.name))
    else:
        print(*login(client))


if __name__ == "__main__":
    main()
