"""The CI deploy entry points: .github/workflows/deploy.yml calls ci_deploy.sh as documented; the script lints."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "deploy.yml"
CI_DEPLOY = ROOT / "deploy" / "ci_deploy.sh"


def documented_variables() -> set[str]:
    """The environment variables ci_deploy.sh's header documents (its interface)."""
    header = CI_DEPLOY.read_text().split("\nset -", 1)[0]
    return set(re.findall(r"^#\s{3}([A-Z][A-Z0-9_]+)\s", header, flags=re.M)) | set(
        re.findall(r"\s{2,}([A-Z][A-Z0-9_]+)\s+default", header)
    )


def test_ci_deploy_passes_shellcheck():
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    result = subprocess.run(
        [shellcheck, "--severity=style", str(CI_DEPLOY)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout


def test_workflow_is_manual_uses_oidc_and_runs_ci_deploy():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as true
    assert list(triggers) == ["workflow_dispatch"]
    assert workflow["permissions"]["id-token"] == "write"
    steps = workflow["jobs"]["deploy"]["steps"]
    aws = next(step for step in steps if step.get("uses", "").startswith("aws-actions/configure-aws-credentials@"))
    assert aws["with"]["role-to-assume"].startswith("${{ secrets.") and "aws-access-key-id" not in aws["with"]
    run = next(step for step in steps if step.get("run") == "deploy/ci_deploy.sh")
    passed = set(run["env"]) | set(workflow["jobs"]["deploy"]["env"])
    assert passed <= documented_variables(), passed - documented_variables()
    teardown = steps[-1]
    assert teardown["if"] == "always()" and "deploy/cleanup.py" in teardown["run"]


def test_ci_deploy_documents_its_interface():
    assert {"IMAGE_URI", "AWS_REGION", "ENDPOINT_NAME", "ROLE", "INSTANCE_TYPE", "PYTHON"} <= documented_variables()
