"""deploy/push_image.sh's own interface, without a registry (the real push runs in make image-test's rehearsal)."""

import os
import subprocess

from tests.helpers import ROOT

SCRIPT = ROOT / "deploy" / "push_image.sh"


def test_help_lists_the_knobs():
    result = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for knob in ("CONTAINER_TOOL", "REPOSITORY", "IMAGE_TAG", "BUILD_FLAGS", "LOCAL_IMAGE", "REGISTRY", "TLS_VERIFY"):
        assert knob in result.stdout
    assert "set -" not in result.stdout  # only the comment block


def test_an_unknown_container_tool_stops_before_any_aws_call():
    env = {**os.environ, "CONTAINER_TOOL": "rocket", "AWS_ENDPOINT_URL": "http://127.0.0.1:9"}
    result = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and result.stdout == ""
    assert "CONTAINER_TOOL=rocket: use docker, buildah or podman" in result.stderr
