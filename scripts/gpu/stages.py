"""The in-process stages of gpu-check, each run by check.py in its own time-boxed subprocess:

    python scripts/gpu/stages.py bandwidth,engine,hf OUT_DIR [--cpu]   (one or more, in order)

Each writes OUT_DIR/<stage>.json as it goes (see common.Recorder), so a stage killed at its time box keeps what it
measured. The engine is driven only through its public interface (serve.engine), so this survives its rewrites.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from common import Plan, Recorder, make_plan, model_folder, random_prompts, stage_log
from tp_stage import stage_tensor_parallel

BASE_VOCAB = 49152  # the embedded tokenizer's own ids: prompts use only these


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(plan: Plan) -> dict[str, Any]:
    """Device-to-device copy of a large buffer: (bytes read + bytes written) / time, best of several."""
    import torch

    numel = plan.copy_mib * 1024 * 1024 // 2
    source = torch.empty(numel, dtype=torch.bfloat16, device=plan.device).normal_()
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    _sync(plan.device)
    best = float("inf")
    for _ in range(10):
        started = time.perf_counter()
        target.copy_(source)
        _sync(plan.device)
        best = min(best, time.perf_counter() - started)
    moved = 2 * source.numel() * source.element_size()
    return {"buffer_mib": plan.copy_mib, "seconds": best, "bytes_per_s": moved / best, "gb_per_s": moved / best / 1e9}


def decode_floor(plan: Plan, folder: Path, bytes_per_s: float) -> dict[str, Any]:
    """Bytes read per decode step (all weights once + every sequence's KV) and the time at ``bytes_per_s``."""
    from transformers import AutoConfig

    from serve.loading.placement import footprint, parameter_count

    config = AutoConfig.from_pretrained(str(folder))
    itemsize = 2 if plan.dtype in ("bfloat16", "float16") else 4
    weights = parameter_count(config) * itemsize
    kv_per_token = footprint(config, itemsize, itemsize).cache_bytes_per_token
    rows = {}
    for batch in plan.batches:
        step_bytes = weights + batch * plan.context * kv_per_token
        ms = step_bytes / bytes_per_s * 1000
        rows[str(batch)] = {"bytes": step_bytes, "floor_ms": ms, "floor_tok_per_s": batch * 1000 / ms}
    return {
        "parameters": parameter_count(config),
        "weight_bytes": weights,
        "kv_bytes_per_token": kv_per_token,
        "context": plan.context,
        "per_batch": rows,
    }


def stage_bandwidth(plan: Plan, out: Path) -> None:
    record = Recorder(out / "bandwidth.json")
    copy = copy_bandwidth(plan)
    record.put("copy", copy)
    stage_log(f"copy bandwidth {copy['gb_per_s']:.1f} GB/s (read + written)")
    record.put("floor", decode_floor(plan, model_folder(out, plan.shape), copy["bytes_per_s"]))


def start_engine(plan: Plan, folder: Path, max_requests: int, total_tokens: int, **overrides: Any) -> Any:
    """Our Engine on the dummy-weights folder, loaded the way the server loads it (``overrides``: more settings)."""
    from serve.wiring import single_engine
    from serve.config import Settings

    settings = Settings(
        model_id=str(folder),
        model_dir="/nonexistent",
        load_format="dummy",
        dtype=plan.dtype,
        max_concurrent_requests=max_requests,
        max_total_tokens=total_tokens,
        **overrides,
    )
    engine = single_engine(settings).start()
    if not engine.wait_ready(300):
        raise RuntimeError(f"engine did not start: {engine.load_error}")
    return engine


def _profiler(plan: Plan) -> Any:
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if plan.gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def _profile_table(prof: Any, plan: Plan) -> str:
    sort = "self_device_time_total" if plan.gpu else "self_cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=sort, row_limit=15)
    except (KeyError, AttributeError, RuntimeError):  # an older torch names device time after CUDA
        table = prof.key_averages().table(sort_by=sort.replace("device", "cuda"), row_limit=15)
    return f"{_kernel_count(prof)}\n{table}" if plan.gpu else table


def _kernel_count(prof: Any) -> str:
    """How many device kernels the profiled span launched (the figure scripts/bench/step_ops.py predicts)."""
    try:
        from torch.autograd import DeviceType

        kernels = sum(1 for event in prof.events() if event.device_type == DeviceType.CUDA)
    except (AttributeError, RuntimeError, ImportError) as exc:
        return f"device kernels: not counted ({type(exc).__name__})"
    return f"device kernels launched: {kernels}"


class StepHook:
    """Wraps the engine's step method from outside (engine files untouched), on the engine's own thread: times
    every step while ``timing`` is set (device synchronised at its end), and profiles the one step after ``arm()``.

    If the step method is renamed, ``available`` is False and nothing is hooked (the outside timing still holds).
    """

    METHOD_NAMES = ("_step", "step")

    def __init__(self, engine: Any, plan: Plan):
        self.plan, self.table, self.timing, self.step_s = plan, None, False, []
        self._armed = False
        name = next((n for n in self.METHOD_NAMES if callable(getattr(engine, n, None))), None)
        self.available = name is not None
        if name is not None:
            setattr(engine, name, self._wrap(getattr(engine, name)))

    def _wrap(self, original: Any) -> Any:
        def step(*args: Any, **kwargs: Any) -> Any:
            if self._armed:
                self._armed = False
                with _profiler(self.plan) as prof:
                    result = original(*args, **kwargs)
                    _sync(self.plan.device)
                self.table = _profile_table(prof, self.plan)
                return result
            started = time.perf_counter()
            result = original(*args, **kwargs)
            if self.timing:
                _sync(self.plan.device)
                self.step_s.append(time.perf_counter() - started)
            return result

        return step

    def arm(self) -> None:
        self.table, self._armed = None, self.available

    def start_timing(self) -> None:
        self.step_s, self.timing = [], True

    def stop_timing(self) -> Optional[float]:
        """The median step time in ms since ``start_timing`` (None when nothing was hooked)."""
        self.timing = False
        return statistics.median(self.step_s) * 1000 if self.step_s else None


class OutsideProfile:
    """A few decode steps profiled from the driving thread (CUDA kernels are recorded whichever thread launched
    them): a second view in case the profiler cannot attach CUDA activity to the engine thread's step."""

    STEPS = 3

    def __init__(self, plan: Plan, batch: int):
        self.plan, self.batch, self.table, self._prof, self._tokens = plan, batch, None, None, 0

    def advance(self, has_token: bool) -> None:
        if self.table is not None:
            return
        if self._prof is None:
            self._prof = _profiler(self.plan)
            self._prof.start()
            return
        self._tokens += has_token
        if self._tokens >= self.STEPS * self.batch:
            self.finish()

    def finish(self) -> None:
        if self._prof is not None and self.table is None:
            self._prof.stop()
            steps = self._tokens / self.batch
            self.table = (
                f"torch.profiler from the driving thread, {steps:g} decode steps at batch {self.batch} "
                f"(divide by {steps:g}):\n{_profile_table(self._prof, self.plan)}"
            )


def time_batch(engine: Any, plan: Plan, batch: int, hook: StepHook, profile: bool) -> dict[str, Any]:
    """ms per decode step at ``batch``: wall time while all requests decode / engine steps taken (tokens / batch)."""
    from serve.engine import Request, SamplingParams

    sink: queue.Queue = queue.Queue()
    params = SamplingParams(max_new_tokens=plan.step_tokens, ignore_eos=True)
    for index, prompt in enumerate(random_prompts(batch, plan.prompt_tokens, BASE_VOCAB, seed=batch)):
        engine.submit(Request(prompt, params), sink=sink, index=index)
    counts, done, start, end, tokens = [0] * batch, 0, None, None, 0
    outside = OutsideProfile(plan, batch) if profile and plan.gpu else None
    step_ms, prefill_ms = None, []
    hook.start_timing()  # the steps until every request has its first token: the prompts' (eager) steps
    while done < batch:
        index, event = sink.get(timeout=300)
        now = time.perf_counter()
        has_token = event.token_id is not None
        counts[index] += has_token
        done += event.finish_reason is not None
        if start is not None and end is None:
            tokens += has_token
            if tokens >= batch * (plan.step_tokens // 2) or event.finish_reason is not None:
                end, step_ms = now, hook.stop_timing()
                if profile:
                    hook.arm()  # the next step, all rows still decoding
        elif start is None and min(counts) >= 1:
            start = now
            prefill_ms = [round(seconds * 1000, 2) for seconds in hook.step_s]
            hook.start_timing()
        elif outside is not None and hook.table is not None:
            outside.advance(has_token)  # after the hooked step: a few more steps profiled from this thread
    steps = tokens / batch
    ms = (end - start) * 1000 / steps if steps else None
    result = {
        "batch": batch,
        "steps_timed": steps,
        "ms_per_step": ms,
        "tok_per_s": batch * 1000 / ms if ms else None,
        "step_method_ms_p50": step_ms,
        "prompt_steps_ms": prefill_ms,  # each step until every request had its first token (the prompts' steps)
    }  # inside the step method only: the rest of ms_per_step is the loop
    if profile:
        table = hook.table or "(not profiled: the engine's step method was not found or no step followed)"
        result["profile"] = f"torch.profiler, one decode step at batch {batch}, on the engine thread:\n{table}"
    if outside is not None:
        outside.finish()
        result["profile_outside"] = outside.table
    return result


def stage_engine(plan: Plan, out: Path) -> None:
    record = Recorder(out / "engine.json")
    folder = model_folder(out, plan.shape)
    started = time.perf_counter()
    engine = start_engine(plan, folder, max(plan.batches), plan.prompt_tokens + plan.step_tokens + 8)
    record.put("load_s", time.perf_counter() - started)
    try:
        hook = StepHook(engine, plan)
        time_batch(engine, plan, 1, hook, profile=False)  # warm-up
        for batch in plan.batches:
            row = time_batch(engine, plan, batch, hook, profile=batch in (1, plan.batches[-2]))
            record.put(f"batch_{batch}", row)
            stage_log(f"engine batch {batch}: {row['ms_per_step']} ms per decode step")
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
    _sync(plan.device)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    _sync(plan.device)
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
