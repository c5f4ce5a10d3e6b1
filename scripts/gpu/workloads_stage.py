"""gpu-check's workloads stage: our engine on what users send, driven through its public interface.

Greedy decode over prompt lengths × concurrencies, a sampled workload (temperature 0.7, top-p 0.9, repetition
penalty 1.1) at the second longest prompt length, and a shared-prefix workload (one long common prefix, a distinct
tail per request). Each cell: decode tok/s, the step method's median ms, bytes read per step (weights + batch × KV
tokens × KV bytes per token) and that floor's ms at the measured copy bandwidth, the share of the floor reached,
TTFT p50, prefix-cache hit tokens and steps by path (CUDA graph replayed / fixed shape eager / other eager).

Each prompt length is prefilled once first (max_new_tokens=1, timed apart); its cells then find those prompts in
the prefix cache and time decode steps only (``workload_new_tokens`` per request, the first half timed once every
request has its first token). A cell whose sequences the KV pool cannot hold at once is skipped, saying so. The
longest prompts run last: a stage cut at its time box keeps every other cell.

GPU plan (8B shape, bf16, H200), about 70 s of its 100 s box: start ~25 s (dummy weights, KV sizing, 81 graph
shapes: 9 batch × 9 width buckets); prefill of 64 × (256 + 2,048 + 8,192) ≈ 0.67 M tokens in 164 steps of 4,096
tokens, ~30 s; 13 cells × 64 decode steps, ~12 s (the costliest, c=64 at 8,192 tokens, reads 16 GB of weights +
69 GB of KV a step: a 20 ms floor). KV pool: 64 × 8,272 tokens × 128 KiB = 65 GiB beside 16 GB of weights, which
an H200 holds (an H100's pool skips that cell).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from common import ModelBytes, Plan, Recorder, model_folder, random_prompts, stage_log
from engine_timing import BASE_VOCAB, StepHook, StepPaths, start_engine, submit_all, time_batch

SAMPLED = {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1}


class Bench:
    """The engine under test and what each cell needs beside it: step hook, path counter, bytes, bandwidth."""

    def __init__(self, engine: Any, plan: Plan, model: ModelBytes, bytes_per_s: Optional[float]):
        self.engine, self.plan, self.model, self.bytes_per_s = engine, plan, model, bytes_per_s
        self.hook, self.paths = StepHook(engine, plan), StepPaths(engine)

    def fits(self, batch: int, context: int) -> bool:
        """Whether the KV pool holds ``batch`` sequences of ``context`` prompt tokens plus their new tokens."""
        limits = self.engine.limits
        per_sequence = context + self.plan.workload_new_tokens + limits.kv_block_size
        return batch * per_sequence <= limits.max_batch_total_tokens

    def params(self, **sampling: float) -> Any:
        from serve.engine import SamplingParams

        return SamplingParams(max_new_tokens=self.plan.workload_new_tokens, ignore_eos=True, **sampling)

    def prefill(self, prompts: list[list[int]]) -> dict[str, Any]:
        """Send ``prompts`` for one token each and wait: the prompts' cost, and their KV left in the prefix cache."""
        from serve.engine import SamplingParams

        before = self.engine.stats()
        started = time.perf_counter()
        sink = submit_all(self.engine, prompts, SamplingParams(max_new_tokens=1, ignore_eos=True))
        finished = 0
        while finished < len(prompts):
            finished += sink.get(timeout=300)[1].finish_reason is not None
        seconds = time.perf_counter() - started
        tokens = sum(len(prompt) for prompt in prompts)
        hits = self.engine.stats().prefix_hit_tokens - before.prefix_hit_tokens
        return {"requests": len(prompts), "tokens": tokens, "seconds": seconds, "prefix_hit_tokens": hits}

    def cell(self, prompts: list[list[int]], params: Any, context: int) -> dict[str, Any]:
        """Time one cell (``time_batch``), then its floor, prefix-cache hits and steps by path."""
        before, paths = self.engine.stats(), dict(self.paths.counts)
        row = time_batch(self.engine, self.plan, len(prompts), self.hook, False, (prompts, params))
        after = self.engine.stats()
        row.update(context=context, **self.floor(len(prompts), context, row["ms_per_step"]))
        row["prefix_hit_tokens"] = after.prefix_hit_tokens - before.prefix_hit_tokens
        row["steps"] = {**self.paths.since(paths), "engine": after.steps - before.steps}
        return row

    def floor(self, batch: int, context: int, ms_per_step: Optional[float]) -> dict[str, Any]:
        """Bytes a step reads at the timed window's mean KV length, and the floor's ms and share reached."""
        kv_tokens = context + self.plan.workload_new_tokens // 4  # the window: new tokens 1 to half of them
        floor_ms = self.model.floor_ms(batch, kv_tokens, self.bytes_per_s) if self.bytes_per_s else None
        share = floor_ms / ms_per_step if floor_ms and ms_per_step else None
        return {"bytes_per_step": self.model.step_bytes(batch, kv_tokens), "floor_ms": floor_ms, "floor_share": share}


def _skipped(bench: Bench, batch: int, context: int) -> dict[str, Any]:
    tokens = bench.engine.limits.max_batch_total_tokens
    return {"skipped": f"{batch} sequences of {context} tokens do not fit the KV pool ({tokens:,} tokens)"}


def _context_cells(bench: Bench, record: Recorder, context: int, label: str, **sampling: float) -> None:
    """One prompt length at every concurrency (prefilled once at the largest that fits, then timed)."""
    plan = bench.plan
    fitting = [batch for batch in plan.workload_concurrencies if bench.fits(batch, context)]
    prompts = random_prompts(max(fitting, default=1), context, BASE_VOCAB, seed=context)
    if fitting:
        record.put(f"prefill_{label}_ctx{context}", bench.prefill(prompts))
    for batch in plan.workload_concurrencies:
        key = f"{label}_ctx{context}_c{batch}"
        if batch not in fitting:
            record.put(key, _skipped(bench, batch, context))
            continue
        row = bench.cell(prompts[:batch], bench.params(**sampling), context)
        record.put(key, {"workload": label, **row})
        stage_log(f"workloads {key}: {row['tok_per_s']} tok/s, {row['step_method_ms_p50']} ms per step")


def _shared_prefix(bench: Bench, record: Recorder) -> None:
    """Requests sharing one long prefix, distinct tails: one request first (its prefix cold), then the rest."""
    prefix_tokens, tail_tokens = bench.plan.workload_prefix
    batch = max(bench.plan.workload_concurrencies)
    prefix = random_prompts(1, prefix_tokens, BASE_VOCAB, seed=prefix_tokens + 1)[0]
    tails = random_prompts(batch + 1, tail_tokens, BASE_VOCAB, seed=tail_tokens + 2)
    context = prefix_tokens + tail_tokens
    if not bench.fits(batch, context):
        record.put(f"shared_prefix_c{batch}", _skipped(bench, batch, context))
        return
    first = bench.prefill([prefix + tails[-1]])
    row = bench.cell([prefix + tail for tail in tails[:batch]], bench.params(), context)
    row.update(workload="shared_prefix", prefix_tokens=prefix_tokens, tail_tokens=tail_tokens)
    row["first_request_ttft_ms"] = first["seconds"] * 1000  # the prefix not yet cached: its whole prompt
    record.put(f"shared_prefix_c{batch}", row)
    stage_log(f"workloads shared prefix c={batch}: {row['prefix_hit_tokens']} prefix-cache hit tokens")


def _bytes_per_s(out: Path) -> Optional[float]:
    """The copy bandwidth the bandwidth stage measured (read + written per second), if it ran."""
    try:
        return json.loads((out / "bandwidth.json").read_text())["copy"]["bytes_per_s"]
    except (OSError, KeyError, ValueError):
        return None


def _setup(engine: Any, bench: Bench) -> dict[str, Any]:
    """What the cells ran under: the engine's limits and its CUDA graphs."""
    graphs = engine.graphs
    return {
        "limits": vars(engine.limits),
        "graphs": {"enabled": graphs.enabled, "shapes": len(graphs.shapes), "reason": graphs.reason},
        "sampled": SAMPLED,
        "new_tokens": bench.plan.workload_new_tokens,
        "copy_bytes_per_s": bench.bytes_per_s,
    }


def stage_workloads(plan: Plan, out: Path) -> None:
    """Greedy over prompt lengths × concurrencies, sampled, the shared prefix; the longest prompts last."""
    record = Recorder(out / "workloads.json")
    folder = model_folder(out, plan.shape)
    longest = max(max(plan.workload_contexts), sum(plan.workload_prefix))
    started = time.perf_counter()
    engine = start_engine(plan, folder, max(plan.workload_concurrencies), longest + plan.workload_new_tokens + 16)
    record.put("load_s", time.perf_counter() - started)
    try:
        bench = Bench(engine, plan, ModelBytes.of(plan, folder), _bytes_per_s(out))
        record.put("setup", _setup(engine, bench))
        *shorter, longest_context = plan.workload_contexts
        for context in shorter:
            _context_cells(bench, record, context, "greedy")
        _context_cells(bench, record, shorter[-1], "sampled", **SAMPLED)  # its prompts still in the prefix cache
        _shared_prefix(bench, record)
        _context_cells(bench, record, longest_context, "greedy")  # the costliest last: a timeout loses only it
    finally:
        engine.stop()
