"""The Triton paged prefill kernel against the gathering reference (``_prefill_attention``), on the CPU through
Triton's interpreter: steps of several prompt chunks (cached prefixes of 0 to 300 tokens, chunks of 1 to 64) behind
decode tokens, over random block tables, through ``attend`` (the chunk's own keys written into the cache first);
KV heads 1/2 under 4 query heads, head dims 64 and 80 (padded), float32 and bfloat16. Then a tiny model's greedy
tokens with a chunked long prompt and prefix-cache hits, the same with the kernel and with the reference.

Triton reads TRITON_INTERPRET when it is first imported, so the cases run once in a fresh process
(``python -m tests.unit.test_paged_prefill_triton [model folder]``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
BLOCK_SIZE = 16
HEADS = 4
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float8_e4m3fn": 1e-5}  # fp8: both widen the same bytes exactly
EDGES = [(0, 37), (16, 1), (300, 64), (5, 20), (0, 1)]  # (cached before, chunk length): a first chunk, one token...
CASES = (  # kv_heads, head dim, dtype, chunks drawn at random besides EDGES
    (1, 64, "float32", 2),  # a group of 4 query heads per KV head
    (2, 80, "float32", 1),  # a group of 2; head dim padded to 128 inside the kernel
    (2, 64, "bfloat16", 2),
    (2, 64, "float8_e4m3fn", 1),  # an fp8 cache (KV_CACHE_DTYPE=fp8), float32 queries; later chunks only (below)
)


def drawn_spans(drawn: int, seed: int) -> list[tuple[int, int]]:
    """EDGES and ``drawn`` random chunks: (cached before, 0 to 300; length, 1 to 64)."""
    generator = torch.Generator().manual_seed(seed)
    positions, lengths = torch.randint(0, 301, (drawn,), generator=generator), torch.randint(1, 65, (drawn,))
    return EDGES + list(zip(positions.tolist(), lengths.tolist()))


def random_step(
    kv_heads: int, dim: int, dtype: torch.dtype, spans: list[tuple[int, int]], seed: int, heads: int = HEADS,
    device: str = "cpu",
):  # fmt: skip
    """(cache, layout, query, key, value) on ``device``: two decode tokens, then a chunk per (cached before, length)
    of ``spans``, each over its own random blocks of a one-layer cache of random values."""
    from serve.engine.attention import PrefillChunk, StepLayout
    from serve.engine.kv_cache import CacheShape, PagedKVCache

    generator = torch.Generator().manual_seed(seed)
    widths = [-(-(position + length) // BLOCK_SIZE) for position, length in spans] + [3, 1]  # + two decode tables
    order = (torch.randperm(sum(widths), generator=generator) + 1).split(widths)  # disjoint, block 0 never used
    cache = PagedKVCache(CacheShape(1, kv_heads, dim, dtype), sum(widths) + 1, BLOCK_SIZE, torch.device(device))
    everywhere = torch.arange(cache.num_blocks * BLOCK_SIZE, device=device)
    stored = [torch.randn(len(everywhere), kv_heads, dim, generator=generator).to(device) for _ in "kv"]
    cache.write(0, everywhere, *stored, calibrate=True)  # an fp8 cache's scales from these values
    order = [table.to(device) for table in order]
    decode_lengths, rows, chunks = [40, 9], [], []
    for table, seen in zip(order[-2:], decode_lengths):
        rows.append(int(table[(seen - 1) // BLOCK_SIZE]) * BLOCK_SIZE + (seen - 1) % BLOCK_SIZE)
    for table, (position, length) in zip(order, spans):
        start = len(rows)
        at = torch.arange(position, position + length, device=device)
        rows += (table[at // BLOCK_SIZE] * BLOCK_SIZE + at % BLOCK_SIZE).tolist()
        chunks.append(PrefillChunk(start, len(rows), position, table))
    tables = torch.stack([order[-2], torch.cat([order[-1], order[-1].new_zeros(2)])])  # padded with scratch
    mask = (torch.arange(3 * BLOCK_SIZE)[None, :] < torch.tensor(decode_lengths)[:, None])[:, None, None, :]
    layout = StepLayout(torch.tensor(rows, device=device), 2, tables, mask.to(device), chunks)
    new_dtype = torch.float32 if cache.quantized else dtype  # a float32 model beside an fp8 cache
    new = lambda count: torch.randn(len(rows), count, dim, generator=generator).to(device, new_dtype)  # noqa: E731
    query = new(heads).transpose(0, 1).contiguous().transpose(0, 1)  # strided, as transformers hands queries over
    return cache, layout, query, new(kv_heads), new(kv_heads)


def kernel_errors() -> dict[str, float]:
    """Largest difference between ``attend`` with the kernel and with the reference, for each case."""
    from serve.engine.attention import active_step, attend, use_prefill_kernel
    from serve.engine.paged_triton_prefill import prefill_attention

    errors = {}
    for seed, case in enumerate(CASES):
        kv_heads, dim, dtype, drawn = case
        spans = drawn_spans(drawn, seed)
        if dtype.startswith("float8"):  # a first chunk's reference attends over its exact keys, not the stored ones
            spans = [(position, length) for position, length in spans if position]
        cache, layout, query, key, value = random_step(kv_heads, dim, getattr(torch, dtype), spans, seed)
        outputs = []
        for kernel in (None, prefill_attention):
            use_prefill_kernel(cache, kernel)
            with active_step(cache, layout):
                outputs.append(attend(0, query, key, value, dim**-0.5 * 1.5 if seed % 2 else None))
        expected, out = outputs
        errors[str(case)] = (out.float() - expected.float()).abs().max().item() if out.dtype == expected.dtype else 1.0
    return errors


def engine_runs(model_dir: str) -> dict:
    """A tiny model's greedy tokens and log-probabilities with the Triton prefill kernel and with the reference:
    a long prompt in chunks of 48 (its prompt scored), then it again and a sibling together (prefix-cache hits of
    148 and 100 tokens, two chunks in a step). {ATTENTION_BACKEND: (the prefill backend, [(tokens, cached tokens,
    logprobs, prompt logprobs)])}."""
    from serve.config import Settings
    from serve.engine import Request, SamplingParams
    from serve.wiring import single_engine

    base = Settings(model_id=model_dir, model_dir="/nonexistent", dtype="float32", max_concurrent_requests=2,
                    max_batch_prefill_tokens=48, kv_block_size=4, max_batch_total_tokens=2048)  # fmt: skip
    prompt = torch.randint(10, 5000, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_new_tokens=4, ignore_eos=True, logprobs=1)
    results = {}
    for backend in ("sdpa", "triton"):  # the references; Triton's prefill (its decode falls back to auto's: cpu)
        engine = single_engine(replace(base, attention_backend=backend)).start()
        assert engine.wait_ready(120), engine.load_error
        try:
            runs = [engine.submit(Request(prompt, replace(params, prompt_logprobs=True)))]
            runs = [list(runs[0])] + [engine.submit(Request(ids, params)) for ids in (prompt, prompt[:100] + [5, 6])]
            results[backend] = (engine.describe()[0].attention.prefill, [_summary(list(run)) for run in runs])
        finally:
            engine.stop()
    return results


def _summary(events: list) -> tuple:
    """(tokens, cached tokens, their log-probabilities, the prompt's) of one request's events."""
    tokens = [event for event in events if event.token_id is not None]
    prompt = events[0].prompt_logprobs or ()
    return [e.token_id for e in tokens], events[-1].cached_tokens, [e.logprob for e in tokens], list(prompt)[1:]


@pytest.fixture(scope="module")
def outcome(tiny_model_dir) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "tests.unit.test_paged_prefill_triton", str(tiny_model_dir)],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_prefill_kernel_matches_the_gathering_reference(outcome, case):
    assert outcome["errors"][str(case)] <= TOLERANCE[case[2]]


def test_greedy_tokens_with_chunks_and_prefix_hits_are_the_same_with_the_kernel(outcome):
    (used_reference, reference), (used_kernel, in_place) = outcome["engine"]["sdpa"], outcome["engine"]["triton"]
    assert (used_reference, used_kernel) == ("sdpa", "triton")
    assert [run[:2] for run in in_place] == [run[:2] for run in reference]  # the same tokens, the same hits
    assert [run[1] for run in in_place] == [0, 148, 100] and len(in_place[0][3]) == 149
    for ours, theirs in zip(in_place, reference):
        assert ours[2] == pytest.approx(theirs[2], abs=1e-4) and ours[3] == pytest.approx(theirs[3], abs=1e-4)


def test_cuda_takes_the_kernel_and_the_cpu_keeps_the_reference_unless_triton_is_asked_for():
    from serve.engine.decode_backends import _choose_prefill

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert _choose_prefill("auto", cuda, torch.bfloat16)[0] == "triton"  # no GPU needed to choose
    assert _choose_prefill("cpu", cuda, torch.float16)[0] == "triton"  # a decode backend that falls back: auto's
    assert _choose_prefill("auto", cuda, torch.float8_e4m3fn)[0] == "triton"  # an fp8 cache: widened in the kernel
    name, kernel, reason = _choose_prefill("auto", cuda, torch.int8)
    assert (name, kernel) == ("sdpa", None) and "not int8" in reason
    assert _choose_prefill("sdpa", cuda, torch.float32)[:2] == ("sdpa", None)
    assert _choose_prefill("auto", cpu, torch.float32)[:2] == ("sdpa", None)  # no in-place CPU decode kernel chosen
    assert _choose_prefill("auto", cpu, torch.float32, "cpu")[0] == "cpu"  # it takes short chunks too
    assert _choose_prefill("auto", cpu, torch.float8_e4m3fn, "cpu")[:2] == ("sdpa", None)
    name, kernel, reason = _choose_prefill("triton", cpu, torch.float32)  # no interpreter in this process
    assert (name, kernel) == ("sdpa", None) and "no CUDA device" in reason


def test_the_prefill_token_budget_is_sized_for_a_gpu_unless_set():
    from serve.config import load_settings
    from serve.engine.types import prefill_token_budget

    assert load_settings({}).max_batch_prefill_tokens is None  # unset: decided at load by the model's device
    assert prefill_token_budget(None, torch.device("cuda", 0)) == 4096
    assert prefill_token_budget(None, torch.device("cpu")) == 512  # the CPU keeps its default
    assert prefill_token_budget(64, torch.device("cuda", 0)) == 64  # MAX_BATCH_PREFILL_TOKENS wins


def test_an_engine_on_the_cpu_prefills_512_tokens_a_step_and_info_says_so(tiny_engine, client):
    assert tiny_engine.limits.max_batch_prefill_tokens == 512 and tiny_engine.scheduler.prefill_budget == 512
    assert client.get("/info").get_json()["max_batch_prefill_tokens"] == 512


if __name__ == "__main__":  # run under TRITON_INTERPRET=1 in a fresh process (Triton reads it when imported)
    print(json.dumps({"errors": kernel_errors(), "engine": engine_runs(sys.argv[1])}))
