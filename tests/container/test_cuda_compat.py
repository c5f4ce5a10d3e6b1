"""CUDA forward compatibility at start-up: the compat libcuda goes first only when the host driver is older."""

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import ENTRYPOINT

COMPAT_LIB = "libcuda.so.580.95.05"
PROPRIETARY = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  {v}  Sun May 12 19:39:15 UTC 2024\nGCC version:  gcc 10\n"
)
OPEN_MODULE = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {v}  Release Build  (dvs-builder@U16)\n"


def run_entrypoint(tmp_path: Path, driver_line: str | None, with_compat: bool = True) -> subprocess.CompletedProcess:
    compat = tmp_path / "compat"
    compat.mkdir()
    if with_compat:
        (compat / COMPAT_LIB).write_bytes(b"")
        (compat / "libcuda.so.1").symlink_to(COMPAT_LIB)
    version_file = tmp_path / "version"
    if driver_line is not None:
        version_file.write_text(driver_line)
    env = {
        **os.environ,
        "CUDA_COMPAT_DIR": str(compat),
        "NVIDIA_DRIVER_VERSION_FILE": str(version_file),
        "LD_LIBRARY_PATH": "/usr/local/nvidia/lib64",
    }
    command = [str(ENTRYPOINT), "bash", "-c", 'echo "$LD_LIBRARY_PATH"']
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30, check=True)


@pytest.mark.parametrize("template", [PROPRIETARY, OPEN_MODULE])
def test_older_driver_puts_the_compat_libraries_first(tmp_path, template):
    result = run_entrypoint(tmp_path, template.format(v="535.183.01"))
    assert result.stdout.strip() == f"{tmp_path / 'compat'}:/usr/local/nvidia/lib64"
    assert "host driver 535.183.01 is older than 580.95.05" in result.stderr


@pytest.mark.parametrize("version", ["580.95.05", "590.44.01"])
def test_same_or_newer_driver_keeps_its_own_libcuda(tmp_path, version):
    result = run_entrypoint(tmp_path, PROPRIETARY.format(v=version))
    assert result.stdout.strip() == "/usr/local/nvidia/lib64"
    assert "compat libraries not used" in result.stderr


def test_no_gpu_driver_changes_nothing(tmp_path):
    result = run_entrypoint(tmp_path, driver_line=None)
    assert result.stdout.strip() == "/usr/local/nvidia/lib64" and result.stderr == ""


def test_image_without_compat_package_changes_nothing(tmp_path):
    result = run_entrypoint(tmp_path, PROPRIETARY.format(v="535.183.01"), with_compat=False)
    assert result.stdout.strip() == "/usr/local/nvidia/lib64" and result.stderr == ""
