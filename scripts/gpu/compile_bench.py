"""Decode-step time of the lean model, eager vs COMPILE, measured interleaved in one process.

    python3 scripts/gpu/compile_bench.py [--model embedded|FOLDER] [--batches 1,32] [--reps 7] [--steps 10]
        [--cache-dir DIR] [--threads N] [--profile] [--json PATH]

Loads the model as the server does (the embedded SmolLM2 GGUF by default, float32 on the CPU), builds the KV cache
and the runner, compiles the layer halves (``ModelRunner.compile_layers``), then for each batch alternates eager
and compiled blocks of ``--steps`` decode steps over ``--context``-token sequences, ``--reps`` times, and prints the
median ms per step of each. ``--profile`` adds a torch.profiler top-10 of one eager step at the first batch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from serve.config import Settings  # noqa: E402
from serve.engine.kv_cache import CacheShape, PagedKVCache  # noqa: E402
from serve.engine.runner import ModelRunner  # noqa: E402
from serve.loading.loader import load_model  # noqa: E402


def build_runner(model_id: str, max_batch: int, context: int, block: int = 16) -> ModelRunner:
    settings = Settings(model_id=None if model_id == "embedded" else model_id, dtype="float32")
    loaded = load_model(settings)
    shape = CacheShape.of(loaded.model.config, loaded.dtype)
    blocks_each = -(-(context + 64) // block)
    cache = PagedKVCache(shape, max_batch * blocks_each + 2, block, [loaded.device] * shape.layers)
    return ModelRunner(loaded.model, cache, None, max_batch, blocks_each)


def decode_rows(runner: ModelRunner, batch: int, context: int) -> list[tuple[int, int, list[int]]]:
    """One decode token per sequence at position ``context``, each sequence with its own blocks (from block 1)."""
    size = runner.cache.block_size
    blocks_each = -(-(context + 1) // size)
    generator = torch.Generator().manual_seed(batch)
    vocab = runner.model.config.vocab_size
    tokens = torch.randint(0, vocab, (batch,), generator=generator).tolist()
    return [(token, context, [1 + i * blocks_each + b for b in range(blocks_each)]) for i, token in enumerate(tokens)]


def step_ms(runner: ModelRunner, rows: list, steps: int) -> tuple[float, float]:
    """Mean wall and CPU ms of ``steps`` decode steps (load, forward, argmax read to the host, as the engine's step).

    The CPU time is this thread's (with one torch thread, all the step's work): on a shared machine it is far less
    noisy than the wall time, which includes waiting for a core."""
    started, cpu = time.perf_counter(), time.thread_time()
    with torch.inference_mode():
        for _ in range(steps):
            batch, width = runner.static.load(rows)
            logits = runner.static.forward(batch, width)[: len(rows)]
            logits.argmax(-1).tolist()
    return 1000 * (time.perf_counter() - started) / steps, 1000 * (time.thread_time() - cpu) / steps


def profile_step(runner: ModelRunner, rows: list) -> str:
    from torch.profiler import ProfilerActivity, profile

    step_ms(runner, rows, 2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step_ms(runner, rows, 1)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)


def _busy() -> None:
    """A side load: a process that keeps one core busy, as HTTP threads and other work do beside the engine."""
    while True:
        sum(range(10000))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--cache-dir", default=Settings().cache_dir)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--threads-ab", default="", help="e.g. 1,2: also interleave these torch thread counts (eager)")
    parser.add_argument("--side-load", type=int, default=0, help="busy processes running beside the measurement")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-compile", action="store_true", help="eager only (e.g. threads or profile alone)")
    parser.add_argument("--json", type=Path)
    return parser.parse_args()


def prepare_variants(runner: ModelRunner, args: argparse.Namespace, first_batch: int, result: dict) -> dict:
    """label -> (layer halves, torch threads): eager, compiled (unless --no-compile or it failed), eager at each
    --threads-ab count; records the compile report and the --profile table in ``result``."""
    eager = runner.model.layer_halves
    compiled = None
    if not args.no_compile:
        report = runner.compile_layers(args.cache_dir)
        result["compile"] = vars(report)
        print("compile:", vars(report), flush=True)
        compiled = runner.model.layer_halves if report.enabled else None
    if args.profile:
        runner.model.layer_halves = eager
        result["profile"] = profile_step(runner, decode_rows(runner, first_batch, args.context))
        print(result["profile"], flush=True)
    threads = torch.get_num_threads()
    variants = {"eager": (eager, threads)}
    if compiled:
        variants["compiled"] = (compiled, threads)
    for count in (int(n) for n in args.threads_ab.split(",") if n):
        variants[f"eager threads={count}"] = (eager, count)
    return variants


def measure_batch(runner: ModelRunner, variants: dict, batch: int, args: argparse.Namespace) -> dict:
    """Median wall and CPU ms per decode step of each variant at ``batch``, the variants interleaved rep by rep."""
    threads = torch.get_num_threads()
    rows = decode_rows(runner, batch, args.context)
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in variants}
    for rep in range(args.reps + 1):  # the first round warms every variant up and is not kept
        for label, (halves, count) in variants.items():
            runner.model.layer_halves = halves
            torch.set_num_threads(count)
            measured = step_ms(runner, rows, args.steps if rep else 2)
            if rep:
                times[label].append(measured)
    torch.set_num_threads(threads)
    return {
        label: {
            "wall": round(statistics.median(w for w, _ in t), 2),
            "cpu": round(statistics.median(c for _, c in t), 2),
            "wall_all": [round(w, 1) for w, _ in t],
        }
        for label, t in times.items()
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    started = time.monotonic()
    runner = build_runner(args.model, max(batches), args.context)
    result: dict = {"threads": torch.get_num_threads(), "load_s": round(time.monotonic() - started, 1), "ms": {}}
    variants = prepare_variants(runner, args, batches[0], result)
    side = [multiprocessing.Process(target=_busy, daemon=True) for _ in range(args.side_load)]
    for process in side:
        process.start()
    for batch in batches:
        result["ms"][batch] = measure_batch(runner, variants, batch, args)
        print(f"batch {batch}:", result["ms"][batch], flush=True)
    for process in side:
        process.terminate()
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
