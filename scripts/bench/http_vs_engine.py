"""Does the HTTP side starve the engine? Tokens/s and the engine thread's busy share at c=64 on a tiny model
(where Python dominates), driven directly and through gunicorn with 64 streaming clients.

Run: .venv/bin/python scripts/bench/http_vs_engine.py   (prints a markdown table)
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import Endpoint, Prompt, run_level  # noqa: E402

from serve.wiring import single_engine  # noqa: E402
from serve.config import Settings  # noqa: E402
from serve.engine import Request, SamplingParams  # noqa: E402
from serve.model.source import embedded_model_file, gguf_to_folder  # noqa: E402
from tests.helpers import build_tiny_llama, start_server  # noqa: E402

CLIENTS, REQUESTS, TOKENS = 64, 128, 64


def busy(url: str) -> tuple[float, float]:
    """The engine's busy seconds and steps so far, from /metrics."""
    values = {}
    for line in requests.get(url + "/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    return float(values["serve_engine_busy_seconds_total"]), float(values["serve_engine_steps_total"])


def direct(model_dir: Path, prompts: list[list[int]]) -> tuple[float, float]:
    """tok/s and busy share with the engine driven from 64 threads' worth of requests, no HTTP."""
    settings = Settings(model_id=str(model_dir), model_dir="/nonexistent", max_concurrent_requests=CLIENTS)
    engine = single_engine(settings).start()
    assert engine.wait_ready(300), engine.load_error
    params = SamplingParams(max_new_tokens=TOKENS, ignore_eos=True)
    started, before = time.perf_counter(), engine.stats().busy_seconds
    tokens = 0
    for batch in range(REQUESTS // CLIENTS):
        streams = [engine.submit(Request(prompt_ids=p, params=params)) for p in prompts[:CLIENTS]]
        tokens += sum(sum(1 for e in s if e.token_id is not None) for s in streams)
    wall = time.perf_counter() - started
    share = (engine.stats().busy_seconds - before) / wall
    engine.stop()
    return tokens / wall, share


def through_http(model_dir: Path) -> tuple[float, float]:
    env = {"HF_MODEL_ID": str(model_dir), "MAX_CONCURRENT_REQUESTS": str(CLIENTS)}
    server = start_server(env, Path(tempfile.mkdtemp()))
    try:
        prompts: list[Prompt] = [f"Tell me about item number {i}, please." for i in range(CLIENTS)]
        endpoint = Endpoint(server.url, "tgi", {"ignore_eos": True})
        before, wall_start = busy(server.url)[0], time.perf_counter()
        level = run_level(endpoint, prompts, CLIENTS, REQUESTS, TOKENS, 300, time.monotonic() + 600)
        wall = time.perf_counter() - wall_start
        return level.output_tok_per_s, (busy(server.url)[0] - before) / wall
    finally:
        server.stop()


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="http-vs-engine-"))
    model_dir = build_tiny_llama(work / "tiny", gguf_to_folder(embedded_model_file(), Settings().cache_dir))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = [tokenizer(f"Tell me about item number {i}, please.")["input_ids"] for i in range(CLIENTS)]
    engine_tok_s, engine_share = direct(model_dir, prompts)
    http_tok_s, http_share = through_http(model_dir)
    print(f"| path (tiny Llama, c={CLIENTS}, {REQUESTS} requests x {TOKENS} tokens) | tok/s | engine busy share |")
    print("| --- | ---: | ---: |")
    print(f"| engine driven directly | {engine_tok_s:.0f} | {engine_share:.0%} |")
    print(f"| through gunicorn, 64 streaming clients | {http_tok_s:.0f} | {http_share:.0%} |")


if __name__ == "__main__":
    main()
