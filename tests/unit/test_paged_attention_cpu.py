"""The CPU paged decode kernel (serve/engine/paged_cpu.c) against the gathering reference, the choice of backend
(ATTENTION_BACKEND) and what /info says of it, and greedy tokens through the engine: identical with either backend."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from serve.config import SettingsError, load_settings
from serve.engine import Request, SamplingParams
from serve.engine.attention import _decode_attention, _decode_kernels
from serve.engine.decode_backends import FLASHINFER_UNAVAILABLE, KERNEL_FOLDER, install_decode_backend
from serve.engine.kv_cache import CacheShape, PagedKVCache
from serve.engine.paged_cpu import load_paged_kernel
from serve.wiring import single_engine
from tests.unit.paged_cases import random_step

CASES = [  # batch, heads, kv_heads, dim, longest
    (4, 8, 2, 64, 40),
    (3, 9, 3, 64, 1000),  # SmolLM2's heads
    (2, 8, 8, 128, 300),
    (1, 4, 1, 128, 2100),
    (3, 6, 2, 80, 100),  # a head dim past a multiple of 64
]


@pytest.fixture(scope="module")
def kernel():
    found, why_not = load_paged_kernel(str(KERNEL_FOLDER))
    if found is None:
        pytest.skip(f"no CPU paged kernel on this machine: {why_not}")
    return found


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cpu_kernel_matches_the_gathering_reference(kernel, case, dtype, tolerance):
    batch, heads, kv_heads, dim, longest = case
    query, keys, values, layout = random_step(batch, heads, kv_heads, dim, longest, dtype, seed=longest)
    expected = _decode_attention(query, keys, values, layout, None)
    out = kernel.decode(query, keys, values, layout.decode_blocks, layout.decode_lengths(), dim**-0.5)
    assert out.dtype == dtype
    assert (out.float() - expected.float()).abs().max().item() <= tolerance


def test_cpu_kernel_reads_a_steps_queries_where_they_lie(kernel):
    """A step's queries are a view of the fused q/k/v output: heads contiguous, tokens further apart."""
    query, keys, values, layout = random_step(4, 9, 3, 64, 90, torch.float32, seed=3)
    fused = torch.randn(4, 15, 64)
    fused[:, :9] = query
    strided = fused[:, :9]
    assert not strided.is_contiguous()
    tables, lengths = layout.decode_blocks, layout.decode_lengths()
    out = kernel.decode(strided, keys, values, tables, lengths, 0.125)
    assert torch.equal(out, kernel.decode(query.contiguous(), keys, values, tables, lengths, 0.125))


@pytest.mark.parametrize("with_long", [False, True], ids=["short chunks", "short and long chunks"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=str)
@pytest.mark.parametrize("kv_heads, dim", [(1, 64), (2, 80), (3, 64)], ids=str)
def test_cpu_kernel_takes_short_prompt_chunks_as_rows_and_leaves_long_ones(
    kernel, kv_heads, dim, dtype, tolerance, with_long
):
    """Every short chunk of a step (first chunks, later chunks, prefix hits) in one call, each token a row over its
    blocks; a chunk ending past ROWS_UP_TO goes to the reference; both between the step's two decode tokens."""
    from serve.engine.attention import active_step, attend, use_prefill_kernel
    from serve.engine.decode_backends import ROWS_UP_TO, cpu_prefill
    from tests.unit.test_paged_prefill_triton import drawn_spans, random_step as prefill_step

    spans = drawn_spans(3, seed=dim)
    spans = [(min(position, 100), length) for position, length in spans]  # all end within ROWS_UP_TO
    if with_long:
        spans[1:1] = [(0, ROWS_UP_TO + 1), (150, 60)]  # rows of the short ones no longer consecutive
    long_ones = [n for n, (position, length) in enumerate(spans) if position + length > ROWS_UP_TO]
    assert bool(long_ones) == with_long
    cache, layout, query, key, value = prefill_step(kv_heads, dim, dtype, spans, seed=kv_heads, heads=6 * kv_heads)
    outputs, prefill = [], cpu_prefill(kernel.decode)
    for installed in (None, prefill):
        use_prefill_kernel(cache, installed)
        with active_step(cache, layout):
            outputs.append(attend(0, query, key, value, None))
    expected, out = outputs
    assert (out.float() - expected.float()).abs().max().item() <= tolerance
    assert prefill(query, cache.keys[0], cache.values[0], layout, None, None, torch.empty_like(query)) == long_ones


def _cache(dtype=torch.float32, head_dim=64) -> PagedKVCache:
    return PagedKVCache(CacheShape(1, 2, head_dim, dtype), 4, 16, torch.device("cpu"))


def test_auto_on_the_cpu_installs_the_in_place_kernel(kernel):
    cache = _cache()
    report = install_decode_backend(cache, "auto")
    assert (report.backend, report.requested) == ("cpu", "auto")
    assert cache in _decode_kernels


@pytest.mark.parametrize(
    "requested, because",
    [("triton", "no CUDA device"), ("flashinfer", FLASHINFER_UNAVAILABLE)],
)
def test_a_backend_that_cannot_run_here_falls_back_to_auto_and_says_why(kernel, requested, because):
    report = install_decode_backend(_cache(), requested)
    assert report.backend == "cpu" and report.requested == requested
    assert because in report.reason and f"ATTENTION_BACKEND={requested} cannot run here" in report.reason


@pytest.mark.parametrize(
    "cache, because",
    [(_cache(torch.float16), "not float16"), (_cache(head_dim=36), "not 36")],
    ids=["float16", "head-dim-36"],
)
def test_caches_the_cpu_kernel_cannot_take_keep_the_gathering_reference(cache, because):
    report = install_decode_backend(cache, "auto")
    assert report.backend == "sdpa" and because in report.reason
    assert cache not in _decode_kernels


def test_sdpa_keeps_the_reference_and_an_unknown_backend_is_refused():
    cache = _cache()
    install_decode_backend(cache, "auto")
    assert install_decode_backend(cache, "sdpa").backend == "sdpa"
    assert cache not in _decode_kernels
    with pytest.raises(ValueError, match="unknown attention backend"):
        install_decode_backend(cache, "paged")


def test_the_setting_takes_the_backends_and_refuses_others():
    assert load_settings({"ATTENTION_BACKEND": "SDPA"}).attention_backend == "sdpa"
    assert load_settings({}).attention_backend == "auto"
    with pytest.raises(SettingsError, match="ATTENTION_BACKEND='paged' is not one of auto, triton, flashinfer"):
        load_settings({"ATTENTION_BACKEND": "paged"})


def test_info_names_the_decode_attention_backend(kernel, client):
    attention = client.get("/info").get_json()["attention"]
    assert attention["backend"] == "cpu" and attention["requested"] == "auto"


def _greedy_tokens(settings, prompts: list[list[int]]) -> tuple[list[list[int]], str]:
    engine = single_engine(settings).start()
    assert engine.wait_ready(120), engine.load_error
    try:
        streams = [engine.submit(Request(p, SamplingParams(max_new_tokens=40, ignore_eos=True))) for p in prompts]
        tokens = [[event.token_id for event in stream if event.token_id is not None] for stream in streams]
        return tokens, engine.describe()[0].attention.backend
    finally:
        engine.stop()


def test_greedy_tokens_in_float32_are_the_same_with_the_cpu_kernel(kernel, tiny_settings, tiny_engine):
    """A batch of prompts of 3 to 150 tokens (1 to 12 blocks), decoded together, mixed with prefill chunks."""
    encode = lambda text: tiny_engine.tokenizer(text)["input_ids"]  # noqa: E731
    prompts = [encode("Hi"), encode("Tell me a story. " * 20), encode("Count: " + " ".join(map(str, range(40))))]
    prompts += [encode(f"Question {n}: what is {n} times {n + 1}?") for n in range(5)]
    settings = replace(tiny_settings, max_batch_prefill_tokens=64)  # chunks: prefill and decode share steps
    reference, used = _greedy_tokens(replace(settings, attention_backend="sdpa"), prompts)
    assert used == "sdpa"
    in_place, used = _greedy_tokens(replace(settings, attention_backend="cpu"), prompts)
    assert used == "cpu"
    assert in_place == reference


def test_the_setting_reaches_an_engine_process_and_comes_back_in_its_report(tiny_settings):
    from serve.engine.process import EngineProcess
    from serve.loading.loader import prepare_model
    from serve.wiring import engine_config, serve_engine_copy

    settings = replace(tiny_settings, attention_backend="sdpa", max_concurrent_requests=2)
    engine = EngineProcess(serve_engine_copy, (settings, prepare_model(settings), 0), engine_config(settings)).start()
    try:
        assert engine.wait_ready(120), engine.load_error
        report = engine.describe()[0].attention
        assert (report.backend, report.requested) == ("sdpa", "sdpa")
    finally:
        engine.stop()
