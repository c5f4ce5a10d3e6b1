"""gpu-check's tensor-parallel stage: TP=1 against TP=N (N: the largest power of two of the visible GPUs, at most 8).

- outputs: greedy tokens of a few prompts on a checkpoint written here (the plan's shape cut to two layers: real
  widths, so the heads and features split as the full model's do), read by each rank from its safetensors slices;
  the share of tokens on which TP=N agrees with TP=1 (bf16 sums in another order may flip a near tie).
- step times: ms per decode step at each batch on the plan's dummy-weights shape, TP=1 then TP=N.

With one GPU it says plainly that it skipped; on the CPU (the dry run) it runs TP=2 over gloo on tiny shapes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from common import Plan, Recorder, model_folder, random_prompts, stage_log

SKIPPED_ONE_GPU = "1 GPU: tensor-parallel stage skipped"
OUTPUT_PROMPTS, OUTPUT_TOKENS, OUTPUT_PROMPT_TOKENS = 4, 16, 32


def ranks_for(plan: Plan) -> int:
    """N for this machine: the largest power of two of its GPUs up to 8 (1: skip), or 2 on the CPU."""
    import torch

    if not plan.gpu:
        return 2
    count = min(torch.cuda.device_count(), 8)
    size = 1
    while size * 2 <= count:
        size *= 2
    return size


def checkpoint_folder(out: Path, plan: Plan) -> Path:
    """The plan's shape cut to two layers, with seeded random weights saved as safetensors (written once)."""
    import torch
    from transformers import AutoConfig

    from serve.loading.loader import build_random

    folder = out / "models" / f"{plan.shape}-2-layers"
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return folder
    source = model_folder(out, plan.shape)
    config = AutoConfig.from_pretrained(str(source))
    config.num_hidden_layers = 2
    model = build_random(config, getattr(torch, plan.dtype), torch.device("cpu"))
    model.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (source / name).is_file():
            (folder / name).write_bytes((source / name).read_bytes())
    return folder


def greedy_tokens(plan: Plan, folder: Path, ranks: int) -> list[list[int]]:
    """Greedy tokens of the output prompts from an engine of ``ranks`` ranks on ``folder``'s checkpoint."""
    from engine_timing import BASE_VOCAB

    from serve.config import Settings
    from serve.engine import Request, SamplingParams
    from serve.wiring import single_engine

    settings = Settings(
        model_id=str(folder),
        model_dir="/nonexistent",
        dtype=plan.dtype,
        max_total_tokens=OUTPUT_PROMPT_TOKENS + OUTPUT_TOKENS + 8,
        max_batch_total_tokens=4096,
        tensor_parallel_size=ranks,
    )
    engine = single_engine(settings).start()
    try:
        if not engine.wait_ready(300):
            raise RuntimeError(f"engine did not start: {engine.load_error}")
        params = SamplingParams(max_new_tokens=OUTPUT_TOKENS, ignore_eos=True)
        prompts = random_prompts(OUTPUT_PROMPTS, OUTPUT_PROMPT_TOKENS, BASE_VOCAB, seed=7)
        streams = [engine.submit(Request(prompt, params)) for prompt in prompts]
        return [[event.token_id for event in stream if event.token_id is not None] for stream in streams]
    finally:
        engine.stop()


def step_times(plan: Plan, out: Path, ranks: int) -> dict[str, Any]:
    """ms per decode step at each of the plan's batches, on the dummy-weights shape, with ``ranks`` ranks."""
    from engine_timing import StepHook, start_engine, time_batch

    folder = model_folder(out, plan.shape)
    started = time.perf_counter()
    engine = start_engine(
        plan, folder, max(plan.batches), plan.prompt_tokens + plan.step_tokens + 8, tensor_parallel_size=ranks
    )
    rows: dict[str, Any] = {"load_s": round(time.perf_counter() - started, 1)}
    try:
        hook = StepHook(engine, plan)
        time_batch(engine, plan, 1, hook, profile=False)  # warm-up
        for batch in plan.batches:
            row = time_batch(engine, plan, batch, hook, profile=False)
            rows[f"batch_{batch}"] = {key: row[key] for key in ("ms_per_step", "tok_per_s", "step_method_ms_p50")}
            stage_log(f"TP={ranks} batch {batch}: {row['ms_per_step']} ms per decode step")
    finally:
        engine.stop()
    return rows


def stage_tensor_parallel(plan: Plan, out: Path) -> None:
    record = Recorder(out / "tensor_parallel.json")
    ranks = ranks_for(plan)
    if ranks < 2:
        record.put("skipped", SKIPPED_ONE_GPU)
        stage_log(SKIPPED_ONE_GPU)
        return
    record.put("ranks", ranks)
    folder = checkpoint_folder(out, plan)
    one, many = greedy_tokens(plan, folder, 1), greedy_tokens(plan, folder, ranks)
    same = sum(a == b for first, second in zip(one, many) for a, b in zip(first, second))
    record.put("outputs", {"tokens": sum(map(len, one)), "equal_tokens": same, "identical": one == many})
    stage_log(f"TP={ranks} outputs: {same} of {sum(map(len, one))} greedy tokens equal to TP=1")
    record.put("tp1", step_times(plan, out, 1))
    record.put(f"tp{ranks}", step_times(plan, out, ranks))
    stage_log(json.dumps(record.data, default=str)[:400])
