"""Where the time to first token goes outside the model: one request at a time on a deep tiny model.

    .venv/bin/python scripts/bench/ttft.py [REQUESTS]

A 32-layer Llama of tiny widths (its prefill costs what its operator dispatch costs, as an eager step does on a GPU)
serves ~128-token prompts, one request at a time, greedy, 2 new tokens. The script reports medians of:

- the prefill step alone (the engine's busy time per step, from its stats);
- the engine driven directly: ``submit`` to the first token's event (queueing, admission, the step, the event);
- through gunicorn, streaming ``/v1/chat/completions``: the client's time to its first content chunk, the engine
  in its own process; beside it the server's own queue + prefill time for the same requests
  (``serve_time_to_first_token_seconds`` from /metrics).

The gap between the client's figure and the engine's is what HTTP, validation, the chat template, tokenization,
the engine process's pipe and the SSE write cost; on a GPU it adds to every request's TTFT unchanged.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import Endpoint, stream_chat  # noqa: E402
from server_metrics import scrape  # noqa: E402

from serve.config import Settings  # noqa: E402
from serve.engine import Request, SamplingParams  # noqa: E402
from serve.loading.source import embedded_model_file, gguf_to_folder  # noqa: E402
from serve.wiring import single_engine  # noqa: E402
from tests.helpers import build_tiny_llama, start_server  # noqa: E402

LAYERS, NEW_TOKENS = 32, 2
SETTLE_S = 1.0  # after /ping: the end of start-up stays out of the warm-up requests
PROMPT = " ".join(f"word{i}" for i in range(40))  # ~128 tokens with the chat template around it


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def direct(model_dir: Path, prompt_ids: list[int], count: int) -> dict[str, float]:
    """Median submit-to-first-event and prefill-step times with the engine in this process, no HTTP."""
    engine = single_engine(Settings(model_id=str(model_dir), model_dir="/nonexistent")).start()
    assert engine.wait_ready(300), engine.load_error
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    firsts, steps = [], []
    for index in range(count + 2):  # two warm-up requests
        stats, started = engine.stats(), time.perf_counter()
        stream = engine.submit(Request(prompt_ids=prompt_ids, params=params))
        events = iter(stream)
        next(events)
        first = time.perf_counter() - started
        after_first = engine.stats()
        list(events)
        if index >= 2:
            firsts.append(first)
            steps.append((after_first.busy_seconds - stats.busy_seconds) / max(1, after_first.steps - stats.steps))
    engine.stop()
    return {"prefill step": median_ms(steps), "engine: submit to first token": median_ms(firsts)}


def server_ttft(url: str) -> tuple[float, float]:
    """(sum, count) of the server's queue + prefill histogram."""
    values = scrape(url) or {}
    name = "serve_time_to_first_token_seconds"
    return values[f"{name}_sum"], values[f"{name}_count"]


def through_http(model_dir: Path, count: int) -> dict[str, float]:
    """Median client TTFT over streaming chat, and the server's mean queue + prefill for the same requests."""
    server = start_server({"HF_MODEL_ID": str(model_dir)}, Path(tempfile.mkdtemp()))
    name = "engine process"
    time.sleep(SETTLE_S)
    try:
        endpoint = Endpoint(server.url, "tgi", {"ignore_eos": True})
        session = requests.Session()
        for _ in range(2):
            stream_chat(session, endpoint, PROMPT, NEW_TOKENS, 60)
        before, ttfts, prompt_tokens = server_ttft(server.url), [], 0
        for _ in range(count):
            result = stream_chat(session, endpoint, PROMPT, NEW_TOKENS, 60)
            assert result.ok, result.error
            ttfts.append(result.ttft_s)
            prompt_tokens = result.prompt_tokens or prompt_tokens
        after = server_ttft(server.url)
        served = (after[0] - before[0]) / (after[1] - before[1])
        return {
            f"HTTP, {name}: client TTFT, median ({prompt_tokens}-token prompt)": median_ms(ttfts),
            f"HTTP, {name}: client TTFT, mean": 1000 * statistics.mean(ttfts),
            f"HTTP, {name}: server queue + prefill, mean": 1000 * served,
        }
    finally:
        server.stop()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    work = Path(tempfile.mkdtemp(prefix="ttft-"))
    model_dir = build_tiny_llama(work / "tiny", gguf_to_folder(embedded_model_file(), Settings().cache_dir), LAYERS)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "user", "content": PROMPT}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    figures = direct(model_dir, list(prompt_ids), count)
    figures.update(through_http(model_dir, count))
    print(f"| {LAYERS}-layer tiny Llama, {len(prompt_ids)}-token prompt, {count} requests one at a time | ms |")
    print("| --- | ---: |")
    for name, value in figures.items():
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
