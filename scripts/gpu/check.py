"""`make gpu-check`: one script for a bare GPU machine (no network), every stage time-boxed, ≤ 9 minutes in all.

    python3 scripts/gpu/check.py OUT_DIR [--cpu]

Stages: (a) copy bandwidth and the decode bandwidth floor, (b) tests/gpu, (c) engine ms per decode step with a
one-step profile, then with COMPILE=true (cold start from an empty inductor cache, ms per step, a warm start in a
fresh process), (d) the real server through gunicorn at several concurrencies, (w) what users send: prompt
lengths × concurrencies greedy, a sampled workload, a shared prefix (workloads_stage.py), (e) HF generate with a
static cache (+ compile), (f) tensor parallelism, TP=1 against TP=N where there are several GPUs. Results go to
OUT_DIR as each stage ends: <stage>.json, results.json (with every <stage>.json under "measured") and results.md
(printed last). Without CUDA the same stages run on tiny shapes on the CPU and say so: a dry run of the script
itself. On the GPU machine, install the wheels of scripts/gpu/fetch_wheels.sh first (see its header).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, Plan, make_plan, model_folder, nvidia_gpu_visible, stage_log  # noqa: E402
from report import markdown  # noqa: E402

HERE = Path(__file__).resolve().parent
TOTAL_GPU_S = 520  # 9 minutes less installing the wheels and starting this script
GPU_BOXES = {
    "bandwidth": 35,
    "tests": 90,
    "engine": 90,
    "verify": 45,  # speculative decoding's verify step against a plain decode step
    "compile": 110,
    "compile_warm": 50,
    "server": 160,
    "workloads": 100,  # what users send: prompt lengths × concurrencies, sampled, shared prefix
    "hf": 110,
    "tensor_parallel": 150,  # skips at once with one GPU
}
# one process for the in-process stages; COMPILE's warm start needs a fresh process (the cache on disk)
CPU_BOXES = {
    "bandwidth,engine,verify,workloads,compile,hf": 400,
    "compile_warm": 90,
    "tests": 120,
    "server": 200,
    "tensor_parallel": 200,
}
NO_GPU = (
    "NO GPU: no CUDA GPU is visible here (nvidia-smi); "
    "every stage ran on tiny shapes on the CPU (a dry run of the script)"
)


def device_line(plan: Plan) -> str:
    """The GPU's name and memory from nvidia-smi, or the plain no-GPU sentence."""
    if not plan.gpu:
        return NO_GPU
    try:
        out = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            .stdout.strip()
            .splitlines()
        )
        return out[0] if out else "a CUDA GPU (nvidia-smi printed nothing)"
    except (OSError, subprocess.SubprocessError):
        return "a CUDA GPU (no nvidia-smi)"


def versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "transformers", "triton", "flask", "gunicorn", "pydantic"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def run_boxed(name: str, argv: list[str], out: Path, box_s: float) -> dict[str, Any]:
    """Run ``argv`` in its own process group for at most ``box_s`` seconds; its output goes to OUT/<name>.log."""
    started = time.monotonic()
    log_path = out / f"{name.replace(',', '+')}.log"
    env = {**os.environ, "GPU_CHECK_OUT": str(out), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = process.wait(box_s)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"timed out after {box_s:.0f} s (kept what it wrote)"
    seconds = time.monotonic() - started
    stage_log(f"{name}: {status} in {seconds:.1f} s (log: {log_path.name})")
    tail = log_path.read_text(errors="replace")[-1500:]
    result = {"status": status, "seconds": round(seconds, 1), "log": log_path.name}
    return {**result, "log_tail": tail} if status != "ok" else result


def run_server(plan: Plan, out: Path, box_s: float) -> dict[str, Any]:
    """The server stage runs here (it only sends HTTP), with its own deadline and a hard stop of gunicorn."""
    import serve_stage

    started = time.monotonic()
    try:
        serve_stage.run(plan, out, box_s)
        status = "ok"
    except Exception as exc:  # noqa: BLE001 - reported in the results; later stages still run
        status = f"failed: {type(exc).__name__}: {str(exc)[:1500]}"
    stage_log(f"server: {status[:200]} in {time.monotonic() - started:.1f} s")
    return {"status": status, "seconds": round(time.monotonic() - started, 1), "log": "server.log"}


def stage_argv(name: str, plan: Plan) -> list[str]:
    if name == "tests":
        return [sys.executable, "-m", "pytest", "tests/gpu", "-m", "gpu", "-q", "-s", "-p", "no:cacheprovider"]
    return [sys.executable, str(HERE / "stages.py"), name, "OUT"] + ([] if plan.gpu else ["--cpu"])


def run_all(plan: Plan, out: Path, results: dict[str, Any]) -> None:
    """Every stage in order, each within min(its box, what is left of the total), results saved after each."""
    boxes = GPU_BOXES if plan.gpu else CPU_BOXES
    deadline = time.monotonic() + (TOTAL_GPU_S if plan.gpu else sum(boxes.values()))
    for name, box in boxes.items():
        left = deadline - time.monotonic()
        if left < 15:
            results["stages"][name] = {"status": "skipped: the 9-minute budget ran out"}
            continue
        box = min(box, left)
        stage_log(f"stage {name} (time box {box:.0f} s)")
        if name == "server":
            results["stages"][name] = run_server(plan, out, box)
        else:
            argv = [str(out) if arg == "OUT" else arg for arg in stage_argv(name, plan)]
            results["stages"][name] = run_boxed(name, argv, out, box)
        save(out, results)


def measured(out: Path) -> dict[str, Any]:
    """Every stage's own <stage>.json by stage name, so that results.json alone holds all the figures."""
    found: dict[str, Any] = {}
    for path in sorted(out.glob("*.json")):
        if path.name != "results.json":
            try:
                found[path.stem] = json.loads(path.read_text())
            except ValueError:  # a stage killed mid-write (Recorder replaces files whole, so rare)
                found[path.stem] = {"unreadable": path.name}
    return found


def save(out: Path, results: dict[str, Any]) -> str:
    """results.json (the statuses and every stage's figures) plus results.md; returns the markdown."""
    (out / "results.json").write_text(json.dumps({**results, "measured": measured(out)}, indent=2, default=str))
    text = markdown(out, results)
    (out / "results.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, nargs="?", default=ROOT / "gpu-check-out")
    parser.add_argument("--cpu", action="store_true", help="the tiny CPU dry run even where CUDA is available")
    args = parser.parse_args(argv)
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    plan = make_plan(gpu=nvidia_gpu_visible() and not args.cpu)
    if not plan.gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # --cpu on a GPU machine: every stage, tests and server on the CPU
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": device_line(plan),
        "gpu": plan.gpu,
        "versions": versions(),
        "plan": plan.to_dict(),
        "stages": {},
    }
    stage_log(results["device"])
    model_folder(out, plan.shape)  # written once here, shared by the stages
    run_all(plan, out, results)
    results["total_s"] = round(time.monotonic() - started, 1)
    print(save(out, results), flush=True)
    failed = [name for name, stage in results["stages"].items() if stage.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
