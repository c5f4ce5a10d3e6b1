"""What a LoRA adapter costs in our engine: the embedded model, base vs adapter vs a mixed batch, output tok/s.

Run: .venv/bin/python scripts/bench/lora.py  (needs peft, from requirements-test.txt, to make the adapter)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dtype import run_level  # noqa: E402
from prompts import PROMPTS  # noqa: E402

from serve.wiring import single_engine  # noqa: E402
from serve.config import Settings  # noqa: E402
from serve.loading.source import embedded_model_file, gguf_to_folder  # noqa: E402
from tests.unit.test_lora import make_adapter  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_LORA_ROUNDS", "3"))


def forward_costs(base: Path, adapter: Path, reps: int = 10) -> None:
    """One forward pass of a flattened step (plain transformers attention), best of ``reps``: base, adapter, mixed."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from serve.engine.lora import attach_adapters

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    lora = attach_adapters(model, {"a": adapter})
    print("| step tokens | base (ms) | all adapter (ms) | half and half (ms) |\n| ---: | ---: | ---: | ---: |")
    for tokens in (8, 256):
        ids = torch.randint(0, 1000, (1, tokens))
        best = []
        for adapters in ([None] * tokens, ["a"] * tokens, [None, "a"] * (tokens // 2)):
            times = []
            with torch.inference_mode():
                for _ in range(reps):
                    lora.begin_step(adapters)
                    started = time.perf_counter()
                    model(input_ids=ids, logits_to_keep=1)
                    times.append(time.perf_counter() - started)
            best.append(min(times) * 1000)
        print(f"| {tokens} | {best[0]:.1f} | {best[1]:.1f} | {best[2]:.1f} |")


def main() -> None:
    base = gguf_to_folder(embedded_model_file(), Settings().cache_dir)
    adapter = make_adapter(base, Path(tempfile.mkdtemp()) / "a", seed=1, rank=16)
    forward_costs(base, adapter)
    settings = Settings(
        dtype="float32",
        model_dir="/nonexistent",
        max_concurrent_requests=8,
        max_total_tokens=512,
        lora_adapters=(("a", str(adapter)),),
    )
    engine = single_engine(settings).start()
    assert engine.wait_ready(600), engine.load_error
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:8]]
    prompts = [
        engine.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
        for c in chats
    ]
    cases = {
        "c=1 base": (1, [None] * 2),
        "c=1 adapter": (1, ["a"] * 2),
        "c=8 base": (8, [None] * 8),
        "c=8 adapter": (8, ["a"] * 8),
        "c=8 mixed (4 + 4)": (8, [None, "a"] * 4),
    }
    best = dict.fromkeys(cases, 0.0)
    run_level(engine, prompts[:1], 1)  # warm-up
    for _ in range(ROUNDS):
        for name, (level, adapters) in cases.items():
            rate, _ = run_level(engine, prompts[: len(adapters)], level, adapters)
            best[name] = max(best[name], rate)
    engine.stop()
    print(f"load average after the run {os.getloadavg()[0]:.1f}")
    print("| case | output tok/s |\n| --- | ---: |")
    for name, rate in best.items():
        print(f"| {name} | {rate:.1f} |")


if __name__ == "__main__":
    main()
