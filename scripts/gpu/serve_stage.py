"""The server stage of gpu-check: the real entrypoint (gunicorn) on the dummy-weights model, driven by the bench
load generator (scripts/bench/load.py) at each concurrency: output tok/s, TTFT and inter-token latency p50/p95,
cold start (process start -> /ping 200) and peak GPU memory (nvidia-smi, device-wide)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from common import ROOT, Plan, Recorder, model_folder, stage_log

sys.path.insert(0, str(ROOT / "scripts" / "bench"))

import requests  # noqa: E402
from load import Endpoint, run_level  # noqa: E402
from peers import group_alive  # noqa: E402

ENTRYPOINT = ROOT / "container" / "entrypoint.sh"
FILLER = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(plan: Plan, folder: Path, port: int) -> dict[str, str]:
    """This environment plus the server's settings; gunicorn found next to the interpreter or in PYTHONPATH/bin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_MODEL", "SM_", "MAX_"))}
    extra_bins = [str(Path(sys.executable).parent)]
    site_dirs = [Path(p) for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    extra_bins += [str(site / "bin") for site in site_dirs if (site / "bin").is_dir()]  # pip install --target
    env["PATH"] = os.pathsep.join([*extra_bins, env.get("PATH", "")])
    env.update(
        {
            "HF_MODEL_ID": str(folder),
            "HF_MODEL_LOAD_FORMAT": "dummy",
            "DTYPE": plan.dtype,
            "SM_MODEL_DIR": "/nonexistent",
            "SAGEMAKER_BIND_TO_PORT": str(port),
            "MAX_CONCURRENT_REQUESTS": str(2 * max(plan.concurrencies)),
            "MAX_TOTAL_TOKENS": str(plan.prompt_tokens + plan.new_tokens + 64),
            "LOG_LEVEL": "INFO",
        }
    )
    return env


class GpuMemory:
    """Polls nvidia-smi for the device-wide memory in use and keeps the peak (MiB); inert without nvidia-smi."""

    def __init__(self, enabled: bool):
        self.peak_mib: Optional[int] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True) if enabled else None
        if self._thread:
            self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            try:
                query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"]
                out = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                self.peak_mib = max(self.peak_mib or 0, int(out.strip().splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass

    def stop(self) -> Optional[int]:
        self._stop.set()
        return self.peak_mib


def start(plan: Plan, folder: Path, log_path: Path, timeout: float) -> tuple[subprocess.Popen, str, float]:
    """Start ``entrypoint.sh serve``; return the process, its URL and the cold start (start -> /ping 200) in s."""
    port = _free_port()
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [str(ENTRYPOINT), "serve"],
            env=server_env(plan, folder, port),
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"server exited with {process.returncode}: {tail}")
        try:
            if requests.get(url + "/ping", timeout=2).status_code == 200:
                return process, url, time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.1)
    stop(process)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s: {log_path.read_text(errors='replace')[-2000:]}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (graceful drain), SIGKILL after 30 s; returns once every process of the
    group is gone (the engine process holds the GPU memory the next server sizes its KV pool from)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    waited = time.monotonic()
    while group_alive(process.pid) and time.monotonic() - waited < 60:  # a zombie nobody reaps counts too: bounded
        if time.monotonic() - waited > 30:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
        time.sleep(0.1)


def prompts_of(url: str, folder: Path, tokens: int, count: int) -> tuple[list[str], int]:
    """``count`` distinct user messages whose chat prompt is about ``tokens`` tokens (measured by the server)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    probe = "Request 0: " + " ".join(FILLER)
    body = {"model": "m", "messages": [{"role": "user", "content": probe}], "max_tokens": 1}
    usage = requests.post(url + "/v1/chat/completions", json=body, timeout=120).json()["usage"]
    overhead = usage["prompt_tokens"] - len(tokenizer.encode(probe, add_special_tokens=False).ids)
    texts = []
    for index in range(count):
        words = " ".join(FILLER[(index + k) % len(FILLER)] for k in range(tokens))
        ids = tokenizer.encode(f"Request {index}: {words}", add_special_tokens=False).ids[: max(tokens - overhead, 1)]
        texts.append(tokenizer.decode(ids))
    return texts, overhead


def run(plan: Plan, out: Path, budget_s: float) -> None:
    """The whole stage within ``budget_s`` seconds (a level not started in time is skipped)."""
    deadline = time.monotonic() + budget_s
    record = Recorder(out / "server.json")
    folder = model_folder(out, plan.shape)
    memory = GpuMemory(plan.gpu)
    try:
        cold = serve_levels(plan, folder, out / "server.log", deadline, record, plan.concurrencies)
        record.put("cold_start_s", cold)
    finally:
        record.put("peak_gpu_memory_mib", memory.stop())


def serve_levels(
    plan: Plan,
    folder: Path,
    log_path: Path,
    deadline: float,
    record: Recorder,
    concurrencies: list[int],
) -> float:
    """Start a server, run each level (recorded as ``c_N``), stop it; returns its cold start in s."""
    budget = deadline - time.monotonic()
    process, url, cold = start(plan, folder, log_path, min(240.0, budget * 0.6))
    stage_log(f"server ready in {cold:.1f} s (process start -> /ping 200)")
    try:
        record.put("info", requests.get(url + "/info", timeout=10).json())
        texts, overhead = prompts_of(url, folder, plan.prompt_tokens, 2 * max(plan.concurrencies))
        record.put(
            "prompt", {"tokens": plan.prompt_tokens, "chat_template_tokens": overhead, "new_tokens": plan.new_tokens}
        )
        endpoint = Endpoint(url, "m", {"ignore_eos": True})
        run_level(endpoint, texts[:2], 1, 1, plan.new_tokens, 120, deadline)  # warm-up
        for concurrency in concurrencies:
            key = f"c_{concurrency}"
            if time.monotonic() > deadline - 5:
                record.put(key, {"skipped": "the stage's time box ran out"})
                continue
            n_requests = 3 if concurrency == 1 else (2 * concurrency if plan.gpu else concurrency)
            read_timeout = max(10.0, min(60.0, deadline - time.monotonic()))  # a stalled stream cannot eat the box
            level = run_level(endpoint, texts, concurrency, n_requests, plan.new_tokens, read_timeout, deadline)
            record.put(key, level.to_dict())
            stage_log(
                f"server {key}: {level.output_tok_per_s} tok/s, TTFT p50 {level.ttft_p50_ms} ms, "
                f"ITL p50 {level.itl_p50_ms} ms, errors {level.errors}"
            )
    finally:
        stop(process)
    return cold
