"""Does the HTTP side starve the engine? Tokens/s, the engine's busy share and its time per step at c=64 on a tiny
model (where Python dominates): driven directly, and through gunicorn with 64 streaming clients, the engine in its
own process.

Run: .venv/bin/python scripts/bench/http_vs_engine.py [ROUNDS]   (prints a markdown table, one row per run)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import Endpoint, Prompt, run_level  # noqa: E402
from server_metrics import scrape  # noqa: E402

from serve.wiring import single_engine  # noqa: E402
from serve.config import Settings  # noqa: E402
from serve.engine import Request, SamplingParams  # noqa: E402
from serve.loading.source import embedded_model_file, gguf_to_folder  # noqa: E402
from tests.helpers import build_tiny_llama, start_server  # noqa: E402

CLIENTS, REQUESTS, TOKENS = 64, 128, 64


def busy(url: str) -> tuple[float, float]:
    """The engine's busy seconds and steps so far, from /metrics."""
    values = scrape(url) or {}
    return values["serve_engine_busy_seconds_total"], values["serve_engine_steps_total"]


def direct(model_dir: Path, prompts: list[list[int]]) -> tuple[float, float, float]:
    """tok/s, busy share and ms per step with the engine driven from 64 requests at a time, no HTTP."""
    settings = Settings(model_id=str(model_dir), model_dir="/nonexistent", max_concurrent_requests=CLIENTS)
    engine = single_engine(settings).start()
    assert engine.wait_ready(300), engine.load_error
    params = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)
    before, started = engine.stats(), time.perf_counter()
    tokens = 0
    for batch in range(REQUESTS // CLIENTS):
        streams = [engine.submit(Request(prompt_ids=p, params=params)) for p in prompts[:CLIENTS]]
        tokens += sum(sum(1 for e in s if e.token_id is not None) for s in streams)
    wall, after = time.perf_counter() - started, engine.stats()
    engine.stop()
    busy_s, steps = after.busy_seconds - before.busy_seconds, after.steps - before.steps
    return tokens / wall, busy_s / wall, busy_s / steps * 1000


def through_http(model_dir: Path) -> tuple[float, float, float]:
    env = {"HF_MODEL_ID": str(model_dir), "MAX_CONCURRENT_REQUESTS": str(CLIENTS)}
    server = start_server(env, Path(tempfile.mkdtemp()))
    try:
        prompts: list[Prompt] = [f"Tell me about item number {i}, please." for i in range(CLIENTS)]
        endpoint = Endpoint(server.url, "tgi", {"ignore_eos": True})
        run_level(endpoint, prompts, CLIENTS, CLIENTS, TOKENS, 300, time.monotonic() + 600)  # warm-up
        (busy_before, steps_before), wall_start = busy(server.url), time.perf_counter()
        level = run_level(endpoint, prompts, CLIENTS, REQUESTS, TOKENS, 300, time.monotonic() + 600)
        wall = time.perf_counter() - wall_start
        busy_after, steps_after = busy(server.url)
        busy_s = busy_after - busy_before
        return level.output_tok_per_s, busy_s / wall, busy_s / (steps_after - steps_before) * 1000
    finally:
        server.stop()


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    work = Path(tempfile.mkdtemp(prefix="http-vs-engine-"))
    model_dir = build_tiny_llama(work / "tiny", gguf_to_folder(embedded_model_file(), Settings().cache_dir))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [tokenizer(f"Tell me about item number {i}, please.")["input_ids"] for i in range(CLIENTS)]
    print(f"| path (tiny Llama, c={CLIENTS}, {REQUESTS} requests x {TOKENS} tokens) | tok/s | engine busy | ms/step |")
    print("| --- | ---: | ---: | ---: |")
    paths = [
        ("engine driven directly", lambda: direct(model_dir, prompts)),
        ("gunicorn, engine process", lambda: through_http(model_dir)),
    ]
    for _ in range(rounds):
        for name, run in paths:
            tok_s, share, step_ms = run()
            print(f"| {name} | {tok_s:.0f} | {share:.0%} | {step_ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
