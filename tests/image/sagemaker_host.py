"""Stand-ins for the AWS side of a deployment, speaking the real protocols on loopback.

- ``Registry``: Debian's `docker-registry` (the CNCF distribution registry) on 127.0.0.1, where
  deploy/push_image.sh pushes the image.
- ``LocalHosting``: what SageMaker hosting does with an endpoint, done with buildah: once an endpoint is InService
  in moto, read its model's image and environment, pull the image from the registry, and run the image's entrypoint
  with `serve` and that environment; when the endpoint is deleted, SIGTERM the container and remove it.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.helpers import Server, free_port
from tests.image.buildah import Container, terminate

REGISTRY_CONFIG = """version: 0.1
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
log:
  level: warn
"""


def port_is_free(port: int) -> bool:
    """Whether a listener can bind ``port`` (SO_REUSEADDR, as the registry sets it: old TIME_WAITs don't count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Registry:
    """A local image registry (plain HTTP on loopback) whose storage persists in ``root`` between runs."""

    def __init__(self, root: Path, log_path: Path, port: int | None = None) -> None:
        self.port = port if port and port_is_free(port) else free_port()
        root.mkdir(parents=True, exist_ok=True)
        config = log_path.with_suffix(".yml")
        config.write_text(REGISTRY_CONFIG.format(root=root, port=self.port))
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                ["docker-registry", "serve", str(config)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.host = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://{self.host}/v2/", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise RuntimeError(f"docker-registry did not start:\n{log_path.read_text()}")

    def tags(self, repository: str) -> list[str]:
        response = requests.get(f"http://{self.host}/v2/{repository}/tags/list", timeout=10)
        return response.json().get("tags") or [] if response.status_code == 200 else []

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


@dataclass
class Hosted:
    """One endpoint's container, as started by LocalHosting."""

    endpoint: str
    image: str
    environment: dict[str, str]
    container: Container
    server: Server
    stopped: tuple[int, float] | None = None  # (exit code, seconds after SIGTERM)


@dataclass(eq=False)  # threads must stay hashable
class LocalHosting(threading.Thread):
    """Runs the container of every InService endpoint found in ``sagemaker`` (a boto3 client on moto) on ``port``."""

    sagemaker: object
    port: int
    log_dir: Path
    endpoints: dict[str, Hosted] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread.__init__(self, daemon=True)
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(1.0):
            try:
                self._sync()
            except Exception as exc:  # keep serving; the test reads ``errors``
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def _sync(self) -> None:
        listed = self.sagemaker.list_endpoints()["Endpoints"]
        live = {e["EndpointName"] for e in listed if e["EndpointStatus"] == "InService"}
        for name in live - {n for n, h in self.endpoints.items() if h.stopped is None}:
            if name not in self.endpoints:
                self.endpoints[name] = self._start(name)
        for name, hosted in self.endpoints.items():
            if name not in live and hosted.stopped is None:
                hosted.stopped = terminate(hosted.server)
                hosted.container.remove()

    def _start(self, endpoint: str) -> Hosted:
        config_name = self.sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
        variant = self.sagemaker.describe_endpoint_config(EndpointConfigName=config_name)["ProductionVariants"][0]
        model = self.sagemaker.describe_model(ModelName=variant["ModelName"])["PrimaryContainer"]
        image, environment = model["Image"], dict(model.get("Environment", {}))
        subprocess.run(["buildah", "rmi", image], capture_output=True)  # drop the local tag: pull from the registry
        subprocess.run(["buildah", "pull", "--tls-verify=false", "--quiet", image], capture_output=True, check=True)
        container = Container(image)
        server = container.serve(self.port, environment, {}, self.log_dir / f"{endpoint}.log")
        return Hosted(endpoint, image, environment, container, server)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        for hosted in self.endpoints.values():
            if hosted.stopped is None:
                hosted.stopped = terminate(hosted.server)
                hosted.container.remove()
