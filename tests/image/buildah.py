"""Run a built image the way SageMaker does, without a daemon: `buildah from` + `buildah run` of its entrypoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import Server

RUN_FLAGS = ["--isolation", "chroot", "--network", "host"]


def image_config(image: str) -> dict:
    """The image's OCI config (Entrypoint, Cmd, Env, ExposedPorts, WorkingDir)."""
    out = subprocess.run(["buildah", "inspect", "--type", "image", image], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["OCIv1"]["config"]


@dataclass
class Container:
    """A working container of ``image``; ``run`` starts the image's ENTRYPOINT with the given arguments."""

    image: str
    name: str = field(default_factory=lambda: f"image-test-{uuid.uuid4().hex[:8]}")

    def __post_init__(self) -> None:
        subprocess.run(
            ["buildah", "from", "--pull=never", "--name", self.name, self.image], capture_output=True, check=True
        )
        self.entrypoint = image_config(self.image)["Entrypoint"]

    def command(self, args: list[str], env: dict[str, str], volumes: dict[Path, str]) -> list[str]:
        flags = [*RUN_FLAGS]
        for source, target in volumes.items():
            flags += ["--volume", f"{source}:{target}"]
        for key, value in env.items():
            flags += ["--env", f"{key}={value}"]
        return ["buildah", "run", *flags, self.name, "--", *self.entrypoint, *args]

    def execute(
        self, args: list[str], env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        """Run the entrypoint with ``args`` to completion."""
        return subprocess.run(self.command(args, env or {}, {}), capture_output=True, text=True, timeout=timeout)

    def serve(self, port: int, env: dict[str, str], volumes: dict[Path, str], log_path: Path) -> Server:
        """`IMAGE serve` with SAGEMAKER_BIND_TO_PORT=port; returns at once (the caller waits for /ping)."""
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                self.command(["serve"], {"SAGEMAKER_BIND_TO_PORT": str(port), **env}, volumes),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return Server(process, port, log_path)

    def remove(self) -> None:
        subprocess.run(["buildah", "rm", self.name], capture_output=True)


def container_main_pid(runner_pid: int) -> int:
    """The container's main process (its PID 1 under docker): the child of buildah's chroot exec helper."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" (", 1)
            children.setdefault(int(rest.rsplit(") ", 1)[1].split()[1]), []).append(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    queue = [runner_pid]
    while queue:
        pid = queue.pop(0)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if cmdline.endswith(b"buildah-chroot-exec") and children.get(pid):
            return children[pid][0]
        queue.extend(children.get(pid, []))
    raise RuntimeError(f"no container process under buildah run (pid {runner_pid})")


def terminate(server: Server, timeout: float = 30.0) -> tuple[int, float]:
    """SIGTERM to the container's main process, as `docker stop` and SageMaker send it; returns (exit code, seconds).

    (buildah run itself answers SIGTERM by killing its child, so the signal goes to the child directly.)
    """
    started = time.monotonic()
    os.kill(container_main_pid(server.process.pid), signal.SIGTERM)
    try:
        code = server.process.wait(timeout)
    except subprocess.TimeoutExpired:
        server.stop(timeout=1)
        code = -1
    return code, time.monotonic() - started
