"""Our engine on a GPU, driven directly (no HTTP): correctness of the paged + graph path, and ms per decode step.

    python3 scripts/gpu/engine_probe.py OUT_DIR [TOKENIZER_DIR]

1. A tiny random Llama in float32: greedy output of 8 concurrent requests through the engine (CUDA graphs on, then
   off) equals transformers' `generate` for each prompt alone.
2. The Llama-3.1-8B shape with random bf16 weights: median ms per decode-only step at batch 1/8/32/64, graphs off
   and on, against the bandwidth floor (weights + KV read once per step over the measured copy bandwidth).
Writes OUT_DIR/engine_probe.json and prints a markdown table. Runs on the CPU too (tiny shapes only, no graphs).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from serve.engine import Engine, EngineConfig, Request, SamplingParams  # noqa: E402
from serve.loading.loader import LoadedModel  # noqa: E402

LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    rope_theta=500000.0,
    max_position_embeddings=131072,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def build(shape: dict, vocab: int, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """A random Llama built directly on the device in ``dtype``."""
    config = LlamaConfig(**{"vocab_size": vocab, "max_position_embeddings": 4096, **shape})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


def engine_for(model, tokenizer, graphs: bool, batch: int, total: int) -> Engine:
    loaded = LoadedModel(model, tokenizer, "probe", model.device, model.dtype, total)
    config = EngineConfig(
        max_concurrent_requests=batch, max_total_tokens=total, max_batch_total_tokens=batch * total, cuda_graphs=graphs
    )
    engine = Engine(load=lambda: loaded, config=config).start()
    assert engine.wait_ready(600), engine.load_error
    return engine


def tokens(stream) -> list[int]:
    return [event.token_id for event in stream if event.token_id is not None]


def check_tiny(tokenizer, device: torch.device) -> dict:
    """Engine (graphs on and off) == HF generate, float32, 8 prompts at once."""
    model = build(TINY, len(tokenizer), torch.float32, device)
    prompts = [tokenizer(f"Prompt number {i}: tell me about item {i * 7}")["input_ids"] for i in range(8)]
    with torch.inference_mode():
        reference = [
            model.generate(
                torch.tensor([p], device=device), max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0
            )[0, len(p) :].tolist()
            for p in prompts
        ]
    result = {}
    for graphs in (True, False):
        engine = engine_for(model, tokenizer, graphs, 8, 256)
        params = SamplingParams(max_new_tokens=20, ignore_eos=True)
        streams = [engine.submit(Request(prompt_ids=p, params=params)) for p in prompts]
        ours = [tokens(s) for s in streams]
        result[f"graphs_{'on' if graphs else 'off'}"] = {
            "equal_to_hf": sum(a == b for a, b in zip(ours, reference)),
            "of": len(prompts),
            "graph_report": vars(engine.graphs) if engine.graphs else None,
        }
        engine.stop()
    return result


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    if device.type != "cuda":
        return 0.0
    src = torch.randn(512 * 1024 * 1024 // 2, dtype=torch.bfloat16, device=device)  # 512 MiB
    dst = torch.empty_like(src)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def decode_ms(engine: Engine, batch: int, prompt_len: int, new_tokens: int, vocab: int) -> float:
    """Median wall time of the decode-only steps that ran ``batch`` sequences (each step ends with a host read)."""
    runner, step, times = engine._runner, engine._runner.step, []

    def timed(plan):
        started = time.perf_counter()
        out = step(plan)
        if not plan.prefill and len(plan.decode) == batch:
            times.append(time.perf_counter() - started)
        return out

    runner.step = timed
    generator = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    streams = [
        engine.submit(
            Request(prompt_ids=torch.randint(0, vocab, (prompt_len,), generator=generator).tolist(), params=params)
        )
        for _ in range(batch)
    ]
    for stream in streams:
        tokens(stream)
    runner.step = step
    return 1000 * statistics.median(times[2:] or times)


def step_figures(tokenizer, device: torch.device, shape: dict, batches: list[int], dtype: torch.dtype) -> dict:
    model = build(shape, shape.get("vocab_size", len(tokenizer)), dtype, device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    figures = {"weight_bytes": weight_bytes, "runs": {}}
    for graphs in (False, True) if device.type == "cuda" else (False,):
        engine = engine_for(model, tokenizer, graphs, max(batches), 512)
        label = "graphs" if graphs else "eager"
        figures["runs"][label] = {
            "graph_report": vars(engine.graphs),
            "ms": {b: decode_ms(engine, b, 128, 48, len(tokenizer)) for b in batches},
        }
        engine.stop()
        del engine
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return figures


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[2] if len(sys.argv) > 2 else str(Path(out) / "tokenizer"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (no GPU)",
        "torch": torch.__version__,
        "copy_bytes_per_s": copy_bandwidth(device),
    }
    report["tiny"] = check_tiny(tokenizer, device)
    print(json.dumps(report["tiny"], default=str), flush=True)
    shape, dtype = (LLAMA_8B, torch.bfloat16) if device.type == "cuda" else (TINY, torch.float32)
    report["steps"] = step_figures(tokenizer, device, shape, [1, 8, 32, 64] if device.type == "cuda" else [1, 4], dtype)
    report["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    (out / "engine_probe.json").write_text(json.dumps(report, indent=1, default=str))
    print_table(report)


def print_table(report: dict) -> None:
    bandwidth, weights = report["copy_bytes_per_s"], report["steps"]["weight_bytes"]
    floor = 1000 * weights / bandwidth if bandwidth else float("nan")
    print(
        f"\n{report['device']}, torch {report['torch']}: copy {bandwidth / 1e12:.2f} TB/s, "
        f"weights {weights / 1e9:.2f} GB, floor {floor:.2f} ms/step (weights only)"
    )
    print("| path | " + " | ".join(f"b={b} ms" for b in next(iter(report["steps"]["runs"].values()))["ms"]) + " |")
    for label, run in report["steps"]["runs"].items():
        print(f"| {label} | " + " | ".join(f"{ms:.2f}" for ms in run["ms"].values()) + " |")
    print("graphs:", {k: v["graph_report"].get("reason") for k, v in report["steps"]["runs"].items()})
    print("tiny:", {k: f"{v['equal_to_hf']}/{v['of']}" for k, v in report["tiny"].items()})


if __name__ == "__main__":
    main()
