"""float32 vs bfloat16 on this CPU, through our engine in-process: output tok/s and greedy-output agreement.

Run: .venv/bin/python scripts/bench/dtype.py  (prints a markdown section for docs/benchmarks.md)
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from prompts import PROMPTS  # noqa: E402

from serve.wiring import single_engine  # noqa: E402
from serve.config import Settings  # noqa: E402
from serve.engine import Engine, Request, SamplingParams  # noqa: E402
from serve.loading.loader import cpu_prefers_bf16  # noqa: E402

TOKENS = int(os.environ.get("BENCH_DTYPE_TOKENS", "32"))
LEVELS = (1, 8)


def run_level(
    engine: Engine, prompts: list[list[int]], concurrency: int, adapters: Optional[list] = None
) -> tuple[float, list[list[int]]]:
    """Generate TOKENS greedy tokens for each prompt (with its LoRA adapter, if given), ``concurrency`` at a time;
    (tok/s, token ids per prompt)."""

    def one(ids: list[int], adapter: Optional[str]) -> list[int]:
        stream = engine.submit(Request(ids, SamplingParams(max_new_tokens=TOKENS, ignore_eos=True), adapter=adapter))
        return [event.token_id for event in stream if event.token_id is not None]

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        outputs = list(pool.map(one, prompts, adapters or [None] * len(prompts)))
    return sum(map(len, outputs)) / (time.monotonic() - started), outputs


def start(dtype: str) -> tuple[Engine, float]:
    settings = Settings(dtype=dtype, model_dir="/nonexistent", max_concurrent_requests=8, max_total_tokens=512)
    started = time.monotonic()
    engine = single_engine(settings).start()
    assert engine.wait_ready(600), engine.load_error
    return engine, time.monotonic() - started


def measure(rounds: int) -> dict:
    """Both dtypes loaded side by side and measured in alternation, best of ``rounds`` (the machine is shared)."""
    engines = {dtype: start(dtype) for dtype in ("float32", "bfloat16")}
    tokenizer = engines["float32"][0].tokenizer
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:8]]
    prompts = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in chats
    ]
    results = {dtype: {"load_s": loaded_in, 1: 0.0, 8: 0.0} for dtype, (_, loaded_in) in engines.items()}
    for dtype, (engine, _) in engines.items():
        run_level(engine, prompts[:1], 1)  # warm-up
    for _ in range(rounds):
        for level in LEVELS:
            for dtype, (engine, _) in engines.items():
                rate, outputs = run_level(engine, prompts[: max(level, 2)], level)
                results[dtype][level] = max(results[dtype][level], rate)
                results[dtype]["outputs"] = outputs
                results[dtype]["texts"] = [tokenizer.decode(ids) for ids in outputs]
    for engine, _ in engines.values():
        engine.stop()
    return results


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[int, float]:
    """How many outputs are identical, and the mean length of the common prefix."""
    prefixes = []
    for x, y in zip(a, b):
        common = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefixes.append(common)
    return sum(x == y for x, y in zip(a, b)), sum(prefixes) / len(prefixes)


def main() -> None:
    results = measure(int(os.environ.get("BENCH_DTYPE_ROUNDS", "3")))
    same, prefix = agreement(results["float32"]["outputs"], results["bfloat16"]["outputs"])
    load = os.getloadavg()[0]
    print(f"DTYPE=auto prefers bf16 on this CPU: {cpu_prefers_bf16()}; load average after the run {load:.1f}")
    print("| dtype | load (s) | c=1 tok/s | c=8 tok/s |")
    print("| --- | ---: | ---: | ---: |")
    for dtype, r in results.items():
        print(f"| {dtype} | {r['load_s']:.1f} | {r[1]:.1f} | {r[8]:.1f} |")
    print(f"greedy outputs identical: {same}/8; mean common prefix {prefix:.1f} of {TOKENS} tokens")
    for index in range(2):
        print(
            f"prompt {index}: fp32 {results['float32']['texts'][index]!r} / "
            f"bf16 {results['bfloat16']['texts'][index]!r}"
        )


if __name__ == "__main__":
    main()
