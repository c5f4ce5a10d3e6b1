"""COMPILE (serve/engine/compile.py): torch.compile of the lean model's layer halves on the CPU (inductor, g++).

Greedy tokens with COMPILE on equal eager ones token for token (float32), serving mixed shapes compiles nothing
after start-up, a second start in a fresh process loads the compiled graphs from the cache under SERVE_CACHE_DIR,
and a compile error leaves the model eager with the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from serve.wiring import engine_config, single_engine
from serve.config import Settings, load_settings
from serve.engine import Engine, Request, SamplingParams
from serve.modeling import LlamaForServing

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["The quick brown fox", "Hello", "def fibonacci(n):\n    if n <", "Once upon a time in a land far, far away"]

# A fresh process: the tiny test model's shapes (tests/helpers.py build_tiny_llama), compiled with the cache given.
FRESH_START = """
import json, os, sys, time
started = time.monotonic()
import torch
from transformers import LlamaConfig
from serve.engine.kv_cache import CacheShape, PagedKVCache
from serve.engine.runner import ModelRunner
from serve.modeling import LlamaForServing
from torch._dynamo.utils import counters
config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
torch.manual_seed(0)
model = LlamaForServing.from_config(config)
runner = ModelRunner(model, PagedKVCache(CacheShape.of(config, torch.float32), 8, 16, torch.device("cpu")), None, 4, 4)
report = runner.compile_layers(sys.argv[1])
print(json.dumps({"report": vars(report), "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "misses": counters["inductor"]["fxgraph_cache_miss"], "process_s": time.monotonic() - started,
                  "environment_after": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}))
"""


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    """One cache folder for the module: the fresh-process test fills it, the engine test then starts warm."""
    return tmp_path_factory.mktemp("serve-cache")


def test_compile_hands_the_engine_the_cache_folder():
    settings = load_settings({"COMPILE": "true", "SERVE_CACHE_DIR": "/somewhere"})
    assert engine_config(settings).compile_cache_dir == "/somewhere"
    assert engine_config(replace(settings, compile=False)).compile_cache_dir is None


def fresh_start(cache: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", FRESH_START, str(cache)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_start_in_a_fresh_process_reuses_the_cache(compile_cache):
    cold = fresh_start(compile_cache)
    warm = fresh_start(compile_cache)
    print(f"\ncompile cold {cold['report']['seconds']} s, warm {warm['report']['seconds']} s")
    assert cold["report"]["enabled"] and warm["report"]["enabled"], (cold, warm)
    assert (compile_cache / "inductor").is_dir() and cold["misses"] > 0
    assert warm["hits"] >= cold["misses"] and warm["misses"] == 0
    assert cold["environment_after"] != str(compile_cache / "inductor")  # inductor's folder only while compiling


def greedy(settings: Settings, prompts: list[list[int]], new_tokens: int = 12) -> tuple[Engine, list[list[int]]]:
    """Greedy tokens of ``prompts`` submitted together (one continuous batch: decode batches 1-4, prompt chunks)."""
    engine = single_engine(settings).start()
    try:
        assert engine.wait_ready(300), engine.load_error
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        streams = [engine.submit(Request(prompt, params)) for prompt in prompts]
        return engine, [[event.token_id for event in stream if event.token_id is not None] for stream in streams]
    finally:
        engine.stop()


def test_compiled_greedy_tokens_equal_eager_and_serving_compiles_nothing_more(
    tiny_model_dir, embedded_folder, compile_cache
):
    from torch._dynamo.utils import counters

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_folder))
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    settings = Settings(
        model_id=str(tiny_model_dir),
        model_dir="/nonexistent",
        cache_dir=str(compile_cache),
        dtype="float32",
        max_concurrent_requests=4,
        max_batch_prefill_tokens=8,  # prompts run in chunks of several sizes beside decode tokens
    )
    _, eager = greedy(settings, prompts)
    engine = single_engine(replace(settings, compile=True))
    engine.start()
    try:
        assert engine.wait_ready(300), engine.load_error
        report = engine._runner.compiled
        assert report.enabled, report.reason
        assert isinstance(engine.loaded.model, LlamaForServing)
        graphs_before = counters["stats"]["unique_graphs"]
        params = SamplingParams(max_new_tokens=12, ignore_eos=True)
        streams = [engine.submit(Request(prompt, params)) for prompt in prompts]
        compiled = [[event.token_id for event in stream if event.token_id is not None] for stream in streams]
        one = [event.token_id for event in engine.submit(Request(prompts[0], params)) if event.token_id is not None]
    finally:
        engine.stop()
    assert compiled == eager and one == eager[0]
    assert counters["stats"]["unique_graphs"] == graphs_before  # every later shape reused the start-up graphs


def test_a_compile_error_leaves_the_model_eager_with_the_reason(monkeypatch, caplog, tmp_path):
    from transformers import LlamaConfig

    from serve.engine.kv_cache import CacheShape, PagedKVCache
    from serve.engine.runner import ModelRunner
    from serve.modeling import llama

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler here")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = LlamaForServing.from_config(config)
    cache = PagedKVCache(CacheShape.of(config, torch.float32), 4, 16, torch.device("cpu"))
    runner = ModelRunner(model, cache, None, 2, 2)
    with caplog.at_level("WARNING"):
        report = runner.compile_layers(str(tmp_path))
    assert not report.enabled and "no C++ compiler here" in report.reason
    assert model.layer_halves == (llama.before_attention, llama.after_attention)
    assert "COMPILE off" in caplog.text
