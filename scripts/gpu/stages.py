"""The in-process stages of gpu-check, each run by check.py in its own time-boxed subprocess:

    python scripts/gpu/stages.py bandwidth,engine,hf OUT_DIR [--cpu]   (one or more, in order)

Each writes OUT_DIR/<stage>.json as it goes (see common.Recorder), so a stage killed at its time box keeps what it
measured. The engine is driven only through its public interface (serve.engine), so this survives its rewrites.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import ModelBytes, Plan, Recorder, make_plan, model_folder, random_prompts, stage_log
from engine_timing import BASE_VOCAB, StepHook, start_engine, synchronize, time_batch
from tp_stage import stage_tensor_parallel
from verify_stage import stage_verify
from workloads_stage import stage_workloads


def copy_bandwidth(plan: Plan) -> dict[str, Any]:
    """Device-to-device copy of a large buffer: (bytes read + bytes written) / time, best of several."""
    import torch

    numel = plan.copy_mib * 1024 * 1024 // 2
    source = torch.empty(numel, dtype=torch.bfloat16, device=plan.device).normal_()
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    synchronize(plan.device)
    best = float("inf")
    for _ in range(10):
        started = time.perf_counter()
        target.copy_(source)
        synchronize(plan.device)
        best = min(best, time.perf_counter() - started)
    moved = 2 * source.numel() * source.element_size()
    return {"buffer_mib": plan.copy_mib, "seconds": best, "bytes_per_s": moved / best, "gb_per_s": moved / best / 1e9}


def decode_floor(plan: Plan, folder: Path, bytes_per_s: float) -> dict[str, Any]:
    """Bytes read per decode step (all weights once + every sequence's KV) and the time at ``bytes_per_s``."""
    model = ModelBytes.of(plan, folder)
    rows = {}
    for batch in plan.batches:
        ms = model.floor_ms(batch, plan.context, bytes_per_s)
        rows[str(batch)] = {
            "bytes": model.step_bytes(batch, plan.context),
            "floor_ms": ms,
            "floor_tok_per_s": batch * 1000 / ms,
        }
    return {
        "parameters": model.parameters,
        "weight_bytes": model.weight_bytes,
        "kv_bytes_per_token": model.kv_bytes_per_token,
        "context": plan.context,
        "per_batch": rows,
    }


def stage_bandwidth(plan: Plan, out: Path) -> None:
    record = Recorder(out / "bandwidth.json")
    copy = copy_bandwidth(plan)
    record.put("copy", copy)
    stage_log(f"copy bandwidth {copy['gb_per_s']:.1f} GB/s (read + written)")
    record.put("floor", decode_floor(plan, model_folder(out, plan.shape), copy["bytes_per_s"]))


def stage_engine(plan: Plan, out: Path) -> None:
    record = Recorder(out / "engine.json")
    folder = model_folder(out, plan.shape)
    started = time.perf_counter()
    engine = start_engine(
        plan, folder, max(plan.batches), plan.prompt_tokens + plan.step_tokens + 8, async_scheduling="true"
    )
    record.put("load_s", time.perf_counter() - started)
    try:
        hook = StepHook(engine, plan)
        time_batch(engine, plan, 1, hook, profile=False)  # warm-up
        ahead = engine.ahead  # ASYNC_SCHEDULING: on for CUDA (auto), forced on for the CPU's dry run
        record.put("async_scheduling", vars(ahead))
        for batch in plan.batches:
            row = time_batch(engine, plan, batch, hook, profile=batch in (1, plan.batches[-2]))
            record.put(f"batch_{batch}", row)
            engine.ahead = replace(ahead, enabled=False)  # the same batch, each step read before the next is planned
            try:
                at_once = time_batch(engine, plan, batch, hook, profile=False)
            finally:
                engine.ahead = ahead
            record.put(f"read_each_step_{batch}", at_once)
            stage_log(
                f"engine batch {batch}: {row['ms_per_step']} ms per decode step "
                f"({at_once['ms_per_step']} ms reading each step first)"
            )
    finally:
        engine.stop()


def _compile_start(plan: Plan, out: Path, batches: tuple[int, ...]) -> tuple[Any, dict[str, Any]]:
    """An engine with COMPILE on, its inductor cache in OUT/compile-cache: (engine, start-up figures)."""
    folder = model_folder(out, plan.shape)
    started = time.perf_counter()
    engine = start_engine(
        plan, folder, max(batches), plan.prompt_tokens + plan.step_tokens + 8, compile=True, cache_dir=str(out)
    )
    report = getattr(getattr(engine, "_runner", None), "compiled", None)  # serve/engine/runner.py's CompileReport
    figures = {"ready_s": time.perf_counter() - started, "report": vars(report) if report is not None else None}
    stage_log(f"COMPILE start: ready in {figures['ready_s']:.1f} s, {figures['report']}")
    return engine, figures


def stage_compile(plan: Plan, out: Path) -> None:
    """COMPILE=true from an empty inductor cache: start-up cost, then ms per decode step (graphs on where CUDA)."""
    import shutil

    shutil.rmtree(out / "inductor", ignore_errors=True)  # compile.inductor_folder puts it under the cache dir given
    record = Recorder(out / "compile.json")
    batches = plan.compile_batches
    engine, figures = _compile_start(plan, out, batches)
    record.put("cold", figures)
    try:
        hook = StepHook(engine, plan)
        time_batch(engine, plan, 1, hook, profile=False)  # warm-up
        for batch in batches:
            row = time_batch(engine, plan, batch, hook, profile=batch == 1)
            record.put(f"batch_{batch}", row)
            stage_log(f"COMPILE engine batch {batch}: {row['ms_per_step']} ms per decode step")
    finally:
        engine.stop()


def stage_compile_warm(plan: Plan, out: Path) -> None:
    """COMPILE=true again in a fresh process, with the cache the compile stage filled: the warm start-up."""
    record = Recorder(out / "compile.json")
    engine, figures = _compile_start(plan, out, plan.compile_batches)
    engine.stop()
    record.put("warm", figures)


def _generate_timed(model: Any, ids: Any, new_tokens: int, plan: Plan) -> float:
    import torch

    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        cache_implementation="static",
        disable_compile=not plan.hf_compile,
        pad_token_id=0,
    )
    synchronize(plan.device)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    synchronize(plan.device)
    return time.perf_counter() - started


def stage_hf(plan: Plan, out: Path) -> None:
    """HF generate with a static cache (auto-compiled on CUDA): the first call compiles, the second is timed."""
    import torch
    from transformers import AutoConfig

    from serve.loading.loader import build_random

    record = Recorder(out / "hf.json")
    config = AutoConfig.from_pretrained(str(model_folder(out, plan.shape)))
    model = build_random(config, getattr(torch, plan.dtype), torch.device(plan.device))
    record.put("setup", {"cache": "static", "compile": plan.hf_compile, "new_tokens": plan.new_tokens})
    for batch in plan.hf_batches:
        ids = torch.tensor(random_prompts(batch, plan.prompt_tokens, BASE_VOCAB, seed=7), device=plan.device)
        first = _generate_timed(model, ids, plan.new_tokens, plan)
        record.put(f"batch_{batch}", {"batch": batch, "first_call_s": first})
        seconds = _generate_timed(model, ids, plan.new_tokens, plan)
        tok_per_s = batch * plan.new_tokens / seconds
        record.put(
            f"batch_{batch}",
            {
                "batch": batch,
                "first_call_s": first,
                "seconds": seconds,
                "tok_per_s": tok_per_s,
                "ms_per_step": seconds * 1000 / plan.new_tokens,
            },
        )
        stage_log(f"HF static generate batch {batch}: {tok_per_s:.0f} tok/s (first call {first:.1f} s)")


STAGES = {
    "bandwidth": stage_bandwidth,
    "engine": stage_engine,
    "compile": stage_compile,
    "compile_warm": stage_compile_warm,
    "hf": stage_hf,
    "tensor_parallel": stage_tensor_parallel,
    "verify": stage_verify,
    "workloads": stage_workloads,
}


def main() -> int:
    parser = argparse.ArgumentParser(description="one gpu-check stage")
    parser.add_argument("stages", help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--cpu", action="store_true", help="the tiny CPU plan even where CUDA is available")
    args = parser.parse_args()
    import torch

    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("nvidia-smi lists a GPU but torch sees no CUDA device: check the driver and torch build")
    plan = make_plan(gpu=not args.cpu)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for stage in args.stages.split(","):
        STAGES[stage](plan, args.out_dir)
        print(json.dumps({"stage": stage, "ok": True}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
