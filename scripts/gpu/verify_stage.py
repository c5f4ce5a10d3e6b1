"""gpu-check's speculative-decoding stage: what a verify step costs against a plain decode step.

A verify step scores k proposed tokens plus the last one per sequence (k + 1 query tokens each, over the paged
cache); a plain decode step scores one. Both run through the engine's own runner on the benchmark shape: the
plain step as the server runs it (the fixed decode shape, a CUDA graph's replay where one was captured) and
eagerly; the verify step as the engine runs it (the fixed decode shape with a row per scored token, replayed
where captured) and, for comparison, eagerly with each sequence's tokens as one chunk. From the plain and the
fixed-shape verify step, the speedup a proposer gets at acceptance rate ``a`` is (1 - a^(k+1)) / (1 - a) tokens
per verify step over the verify step's cost in plain steps (each proposed token accepted with probability ``a``,
independently).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

from common import Plan, Recorder, model_folder, stage_log
from engine_timing import start_engine, synchronize

PROPOSED = (1, 2, 3, 4, 6, 8)  # k, tokens proposed per sequence
ACCEPTANCE = (0.5, 0.7, 0.9)
REPS = 10


def _ms(run: Callable[[], Any], device: str) -> float:
    """Median ms of ``REPS`` calls after two warm-ups."""
    times = []
    for index in range(REPS + 2):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        if index >= 2:
            times.append(1000 * (time.perf_counter() - started))
    return round(statistics.median(times), 3)


def _tables(runner: Any, batch: int, context: int, extra: int) -> list[list[int]]:
    """Distinct block tables (past the scratch block) holding ``context + extra`` tokens per sequence."""
    size = runner.cache.block_size
    per = -(-(context + extra) // size)
    return [[1 + seq * per + index for index in range(per)] for seq in range(batch)]


def _inputs(runner: Any, tables: list[list[int]], context: int, tokens: int, as_decode: bool) -> Any:
    """A step of ``tokens`` new tokens per sequence at position ``context``: decode rows (one token each) or
    verified chunks, as ``ModelRunner._inputs`` lays them out."""
    from serve.engine.step_inputs import StepInputs

    size = runner.cache.block_size
    ids, positions, rows, chunks = [], [], [], []
    for table in tables:
        start = len(ids)
        for position in range(context, context + tokens):
            ids.append(7)
            positions.append(position)
            rows.append(table[position // size] * size + position % size)
        if not as_decode:
            chunks.append((start, len(ids), context, table[: -(-(context + tokens) // size)]))
    decode = tables if as_decode else []
    lengths = [context + 1] * len(decode)
    return StepInputs(ids, positions, rows, decode, lengths, chunks, list(range(len(ids))))


def _row(runner: Any, plan: Plan, batch: int, context: int) -> dict[str, Any]:
    """The plain step (fixed shape and eager) and the verify step for each k, at ``batch``, with the speedups."""
    tables = _tables(runner, batch, context, max(PROPOSED) + 1)
    static_rows = [(7, context, table) for table in tables]

    def fixed_shape() -> Any:
        shape = runner.static.load(static_rows)
        return runner.static.forward(*shape)

    plain = _ms(fixed_shape, plan.device)
    eager = _ms(lambda: runner.forward(_inputs(runner, tables, context, 1, True)), plan.device)
    row: dict[str, Any] = {"plain_ms": plain, "plain_eager_ms": eager, "verify": {}}
    for k in PROPOSED:
        verify_rows = [(7, context + index, table) for table in tables for index in range(k + 1)]
        verify = _ms(lambda: runner.static.forward(*runner.static.load(verify_rows)), plan.device)
        chunked = _ms(lambda: runner.forward(_inputs(runner, tables, context, k + 1, False)), plan.device)
        cost = verify / plain
        gains = {f"a={a}": round((1 - a ** (k + 1)) / (1 - a) / cost, 3) for a in ACCEPTANCE}
        row["verify"][f"k={k}"] = {
            "ms": verify,
            "chunk_eager_ms": chunked,
            "cost_in_plain_steps": round(cost, 3),
            "speedup": gains,
        }
    return row


def stage_verify(plan: Plan, out: Path) -> None:
    """The verify step against the plain one at batch 1 and the smallest of the plan's larger batches."""
    import torch

    record = Recorder(out / "verify.json")
    folder = model_folder(out, plan.shape)
    context = plan.prompt_tokens
    batches = (1, plan.batches[1])
    rows = max(batches) * (max(PROPOSED) + 1)  # the fixed shape holds a verify step's rows, as in the engine
    engine = start_engine(plan, folder, rows, context + max(PROPOSED) + 8)
    try:
        runner = engine._runner  # idle while this stage drives it: no request is submitted
        record.put("graphs", runner.graphs.reason)
        with torch.inference_mode():
            for batch in batches:
                row = _row(runner, plan, batch, context)
                record.put(f"batch_{batch}", row)
                best = max(row["verify"].items(), key=lambda item: item[1]["speedup"]["a=0.7"])
                stage_log(f"verify batch {batch}: plain {row['plain_ms']} ms; best at a=0.7: {best[0]} {best[1]}")
    finally:
        engine.stop()
