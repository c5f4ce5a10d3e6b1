"""The engine's CPU step on the embedded model (SmolLM2-135M: 30 layers, hidden 576, vocab 49152) per weight path:
float32 on the panel kernel, bfloat16 on the panel kernel (AVX-512 BF16), bfloat16 dense (oneDNN), each eager and,
with ``--compile``, under COMPILE (torch.compile of the layer halves around attention).

    python3 scripts/bench/cpu_step.py [--batches 1,8,32] [--chunk 256] [--rounds 5] [--reps 5] [--compile]
        [--threads N] [--only TEXT]

Every configuration is built once; then each round times every step of every configuration in turn (so a noisy
neighbour slows all of them alike), and the table gives each step's median over rounds of the best of ``--reps``.
On a machine shared with other busy processes, ``--threads 1`` measures CPU time, which they cannot inflate (two
threads wait for each other at every op whenever a third process holds one of the cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from scripts.bench.step_ops import decode_step, prefill_step  # noqa: E402
from serve.config import load_settings  # noqa: E402
from serve.engine.kv_cache import CacheShape, PagedKVCache  # noqa: E402
from serve.engine.runner import ModelRunner  # noqa: E402
from serve.loading.source import embedded_model_file, gguf_to_folder  # noqa: E402
from serve.modeling.cpu_kernel import load_panel_kernel  # noqa: E402
from serve.modeling.layers import pack_for_cpu, use_layer_ops  # noqa: E402
from serve.modeling.weights import load_pretrained  # noqa: E402

# name: (dtype, pack with the panel kernel)
PATHS = {
    "float32, panel kernel": (torch.float32, True),
    "bf16, panel kernel": (torch.bfloat16, True),
    "bf16, dense (oneDNN)": (torch.bfloat16, False),
}


def build(folder: Path, dtype: torch.dtype, packed: bool, max_batch: int, context: int, block: int = 16):
    """A runner over the embedded model's weights in ``dtype``, its linear layers on the panel kernel if ``packed``."""
    from transformers import AutoConfig

    model = load_pretrained(folder, AutoConfig.from_pretrained(folder), "cpu", dtype)
    if packed:
        settings = load_settings()
        kernel, why_not = load_panel_kernel(settings.cache_dir, settings.c_compiler)
        assert kernel is not None, why_not
        print(f"{dtype}: {pack_for_cpu(model, kernel)}", flush=True)
        if dtype == torch.float32:  # as serve.loading.cpu_weights does
            use_layer_ops(model, kernel.layer_ops)
    blocks_each = -(-(context + 1) // block)
    cache = PagedKVCache(CacheShape.of(model.config, dtype), max_batch * blocks_each + 2, block, torch.device("cpu"))
    return ModelRunner(model, cache, None, max_batch, blocks_each)


def best_ms(run: Callable[[], None], reps: int) -> float:
    """The fastest of ``reps`` calls: the calling thread's CPU time with one torch thread (all of the step's work,
    none of the time other processes hold the core), else the wall clock."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    with torch.inference_mode():
        run()
        times = []
        for _ in range(reps):
            started = clock()
            run()
            times.append(1000 * (clock() - started))
    return min(times)


def configurations(args: argparse.Namespace, folder: Path, context: int) -> dict[str, ModelRunner]:
    """Every measured runner by name (the compiled ones too, with ``--compile``)."""
    runners = {}
    for name, (dtype, packed) in PATHS.items():
        if args.only not in name:
            continue
        runners[name] = build(folder, dtype, packed, max(args.batches), context)
        if args.compile:
            compiled = build(folder, dtype, packed, max(args.batches), context)
            report = compiled.compile_layers(tempfile.mkdtemp(prefix="cpu-step-inductor-"))
            print(f"{name}, COMPILE: {report.reason} ({report.seconds} s)", flush=True)
            if report.enabled:
                runners[f"{name}, COMPILE"] = compiled
    return runners


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8,32", type=lambda text: [int(b) for b in text.split(",")])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--only", default="", help="the paths whose name contains this text (default: all)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, every core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    context = max(args.context, args.chunk)
    runners = configurations(args, gguf_to_folder(embedded_model_file(), load_settings().cache_dir), context)
    steps = {f"decode {b}": (lambda r, b=b: decode_step(r, b, args.context)) for b in args.batches}
    steps[f"prefill {args.chunk}"] = lambda r: prefill_step(r, args.chunk)
    closures = {(config, step): make(runner) for config, runner in runners.items() for step, make in steps.items()}
    times: dict = {key: [] for key in closures}
    for _ in range(args.rounds):
        for key, run in closures.items():
            times[key].append(best_ms(run, args.reps))
    clock = "CPU" if torch.get_num_threads() == 1 else "wall"
    rounds = f"median of {args.rounds} rounds of best-of-{args.reps}"
    print(f"{torch.get_num_threads()} thread(s); {clock} ms per step, {rounds}")
    print("| path | " + " | ".join(steps) + " |\n| --- |" + " ---: |" * len(steps))
    for config in runners:
        cells = [f"{statistics.median(times[(config, step)]):.2f}" for step in steps]
        print(f"| {config} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
