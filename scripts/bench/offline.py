"""No-server reference: batched greedy ``model.generate`` on the same prompts, in its own process.

Run by run.py as ``python offline.py MODEL_DIR '{"levels": [[batch, n_prompts], ...], "max_new_tokens": 64}'``;
prints one JSON line per batch size (prefixed ``RESULT ``) so a time-out still leaves the finished ones.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

from prompts import PROMPTS


def load(model_dir: str) -> tuple[Any, Any, float]:
    """Tokenizer (left padding) and float32 model in eval mode, and the seconds loading took."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tokenizer, model, time.perf_counter() - started


def chat_texts(tokenizer: Any, prompts: list[str]) -> list[str]:
    """Each prompt as a one-turn chat, rendered with the model's template, ready for generation."""
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def generate_batch(tokenizer: Any, model: Any, texts: list[str], max_new_tokens: int) -> int:
    """Greedy-generate exactly ``max_new_tokens`` for each text; return the number of new tokens."""
    import torch

    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
    return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]


def run_level(tokenizer: Any, model: Any, batch: int, n_prompts: int, max_new_tokens: int) -> dict[str, Any]:
    """Generate for ``n_prompts`` prompts (cycled) in batches of ``batch``; tok/s over the whole level."""
    texts = chat_texts(tokenizer, [PROMPTS[i % len(PROMPTS)] for i in range(n_prompts)])
    tokens, started = 0, time.perf_counter()
    for first in range(0, n_prompts, batch):
        tokens += generate_batch(tokenizer, model, texts[first : first + batch], max_new_tokens)
    wall = time.perf_counter() - started
    return {
        "concurrency": batch,
        "requests": n_prompts,
        "batches": math.ceil(n_prompts / batch),
        "errors": 0,
        "wall_s": round(wall, 3),
        "output_tokens": tokens,
        "output_tok_per_s": round(tokens / wall, 2),
        "ttft_p50_ms": None,
        "ttft_p95_ms": None,
        "latency_p50_ms": round(wall / math.ceil(n_prompts / batch) * 1000, 1),
        "tokens_per_request_min": max_new_tokens,
        "first_error": None,
    }


def main(argv: list[str]) -> None:
    """Load once, warm up with one short generation, then run each (batch, n_prompts) level."""
    import torch

    model_dir, settings = argv[1], json.loads(argv[2])
    tokenizer, model, load_s = load(model_dir)
    print("LOADED " + json.dumps({"load_s": round(load_s, 2), "torch_threads": torch.get_num_threads()}), flush=True)
    generate_batch(tokenizer, model, chat_texts(tokenizer, PROMPTS[:1]), 8)
    for batch, n_prompts in settings["levels"]:
        result = run_level(tokenizer, model, batch, n_prompts, settings["max_new_tokens"])
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv)
