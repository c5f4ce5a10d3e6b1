"""Driving our engine for gpu-check's timings: start it the way the server loads a model, time decode steps at a
batch (wall time and inside the step method), and profile one step."""

from __future__ import annotations

import queue
import statistics
import time
from pathlib import Path
from typing import Any, Optional

from common import Plan, random_prompts

BASE_VOCAB = 49152  # the embedded tokenizer's own ids: prompts use only these


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


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
    """Wraps the engine's step methods from outside (engine files untouched), on the engine's own thread: times
    every step while ``timing`` is set, and profiles the one step after ``arm()``. A step read at once is timed to
    the device's end (synchronised); a step launched ahead of the last one's read (ASYNC_SCHEDULING) is timed on
    the host only, since a synchronise would undo the overlap it is there to give.

    If the step methods are renamed, ``available`` is False and nothing is hooked (the outside timing still holds).
    """

    METHOD_NAMES = ("at_once", "ahead")  # serve.engine.steps.Steps: a step read at once, and launched ahead

    def __init__(self, engine: Any, plan: Plan):
        self.plan, self.table, self.timing, self.step_s = plan, None, False, []
        self._armed = False
        steps = getattr(engine, "_steps", None)
        names = [name for name in self.METHOD_NAMES if callable(getattr(steps, name, None))]
        self.available = bool(names)
        for name in names:
            setattr(steps, name, self._wrap(getattr(steps, name), ahead=name == "ahead"))

    def _wrap(self, original: Any, ahead: bool) -> Any:
        def step(*args: Any, **kwargs: Any) -> Any:
            if self._armed:
                self._armed = False
                with _profiler(self.plan) as prof:
                    result = original(*args, **kwargs)
                    synchronize(self.plan.device)
                self.table = _profile_table(prof, self.plan)
                return result
            started = time.perf_counter()
            result = original(*args, **kwargs)
            if self.timing:
                if not ahead:
                    synchronize(self.plan.device)
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


class StepPaths:
    """The engine's forward passes by path, as it counts them (``EngineStats.step_paths``): decode steps that
    replayed a CUDA graph, decode and verify steps over the fixed shape run eagerly (no graph for the shape, or no
    CUDA), the other steps (prompt chunks, prompts mixed with decode rows) run eagerly, and those whose layer halves
    replayed piecewise graphs."""

    PATHS = ("graph", "fixed_shape_eager", "other_eager", "piecewise")

    def __init__(self, engine: Any):
        self.engine = engine

    @property
    def counts(self) -> dict[str, int]:
        return dict(zip(self.PATHS, self.engine.stats().step_paths or (0,) * len(self.PATHS)))

    def since(self, before: dict[str, int]) -> dict[str, int]:
        """Steps per path since ``before`` (``counts`` taken then)."""
        now = self.counts
        return {path: now[path] - before.get(path, 0) for path in self.PATHS}


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


def submit_all(engine: Any, prompts: list[list[int]], params: Any) -> queue.Queue:
    """One request per prompt (its index: the prompt's place); their events arrive on the queue returned."""
    from serve.engine import Request

    sink: queue.Queue = queue.Queue()
    for index, prompt in enumerate(prompts):
        engine.submit(Request(prompt, params), sink=sink, index=index)
    return sink


def _plan_requests(plan: Plan, batch: int) -> tuple[list[list[int]], Any]:
    """The plan's distinct random prompts, greedy, ``plan.step_tokens`` new tokens each (ignore_eos)."""
    from serve.engine import SamplingParams

    params = SamplingParams(max_new_tokens=plan.step_tokens, ignore_eos=True)
    return random_prompts(batch, plan.prompt_tokens, BASE_VOCAB, seed=batch), params


def time_batch(
    engine: Any, plan: Plan, batch: int, hook: StepHook, profile: bool, requests: Optional[tuple[list, Any]] = None
) -> dict[str, Any]:
    """ms per decode step at ``batch``: wall time while all requests decode / engine steps taken (tokens / batch).

    ``requests``: (prompts, SamplingParams) to send instead of the plan's (``batch`` prompts, ignore_eos)."""
    prompts, params = requests or _plan_requests(plan, batch)
    submitted = time.perf_counter()
    sink = submit_all(engine, prompts, params)
    counts, first_ms, done, start, end, tokens = [0] * batch, [], 0, None, None, 0
    outside = OutsideProfile(plan, batch) if profile and plan.gpu else None
    step_ms, prefill_ms = None, []
    hook.start_timing()  # the steps until every request has its first token: the prompts' (eager) steps
    while done < batch:
        index, event = sink.get(timeout=300)
        now = time.perf_counter()
        has_token = event.token_id is not None
        counts[index] += has_token
        done += event.finish_reason is not None
        if has_token and counts[index] == 1:
            first_ms.append((now - submitted) * 1000)
        if start is not None and end is None:
            tokens += has_token
            if tokens >= batch * (params.max_new_tokens // 2) or event.finish_reason is not None:
                end, step_ms = now, hook.stop_timing()
                if profile:
                    hook.arm()  # the next step, all rows still decoding
        elif start is None and min(counts) >= 1:
            start = now
            prefill_ms = [round(seconds * 1000, 2) for seconds in hook.step_s]
            hook.start_timing()
        elif outside is not None and hook.table is not None:
            outside.advance(has_token)  # after the hooked step: a few more steps profiled from this thread
    ms = (end - start) * 1000 * batch / tokens if tokens else None
    result = {
        "batch": batch,
        "steps_timed": tokens / batch,
        "ms_per_step": ms,
        "tok_per_s": batch * 1000 / ms if ms else None,
        "step_method_ms_p50": step_ms,  # inside the step method only: the rest of ms_per_step is the loop
        "prompt_steps_ms": prefill_ms,  # each step until every request had its first token (the prompts' steps)
        "first_token_ms_p50": statistics.median(first_ms) if first_ms else None,  # from submission
    }
    return _with_profiles(result, hook, outside, profile)


def _with_profiles(result: dict[str, Any], hook: StepHook, outside: Optional[OutsideProfile], profile: bool) -> dict:
    """``result`` plus the profiled step's table (engine thread) and the driving thread's, when asked."""
    if profile:
        table = hook.table or "(not profiled: the engine's step method was not found or no step followed)"
        result["profile"] = (
            f"torch.profiler, one decode step at batch {result['batch']}, on the engine thread:\n{table}"
        )
    if outside is not None:
        outside.finish()
        result["profile_outside"] = outside.table
    return result
