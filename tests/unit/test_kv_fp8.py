"""KV_CACHE_DTYPE=fp8: keys and values stored as float8 e4m3 with per-layer scales set by the first prefill, half
the bytes per token, and every read path (the gathering reference, the Triton kernel under Triton's interpreter,
an engine's greedy run) close to the exact cache.

Tolerances: e4m3 keeps 3 mantissa bits (a stored value is within 2**-4 = 6.25% of the value), so attention over
fp8 keys and values is held to a relative error (norm of the difference over the norm of the exact output) of at
most 6% on random unit-variance caches; the Triton kernel and the reference over the same fp8 cache agree within
float32 rounding (1e-5), or bfloat16 rounding (2e-2) for a bfloat16 query."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serve.engine.attention import _decode_attention
from serve.engine.kv_cache import FP8_MAX, CacheShape, PagedKVCache, plan_blocks, storage_dtype
from tests.unit.kv_fp8_cases import FP8_CASES, fp8_step, relative

ROOT = Path(__file__).resolve().parents[2]
FP8_RELATIVE_ERROR = 0.06
SAME_CACHE_TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
FP8 = torch.float8_e4m3fn


def test_fp8_halves_the_bytes_per_token_and_the_pool_holds_twice_the_tokens():
    bf16, fp8 = CacheShape(32, 8, 128, torch.bfloat16), CacheShape(32, 8, 128, FP8)
    assert bf16.bytes_per_token == 2 * fp8.bytes_per_token == 131072
    memory = 2 * 1024**3
    assert plan_blocks(fp8, 16, None, memory, 4096) - 1 == 2 * (plan_blocks(bf16, 16, None, memory, 4096) - 1)


def test_kv_cache_dtype_picks_the_storage_and_refuses_fp8_without_torch_support(monkeypatch):
    assert storage_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert storage_dtype("fp8", torch.bfloat16) == FP8
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match="KV_CACHE_DTYPE=fp8 needs torch.float8_e4m3fn"):
        storage_dtype("fp8", torch.bfloat16)


def test_writes_quantize_with_scales_set_by_the_first_prefill_only():
    cache = PagedKVCache(CacheShape(2, 2, 8, FP8), 3, 4, torch.device("cpu"))
    assert cache.keys[0].dtype == FP8 and cache.quantized
    decode_key = torch.full((1, 2, 8), 1000.0)
    cache.write(0, torch.tensor([1]), decode_key, decode_key)  # no prompt tokens: no calibration
    assert cache.scales[0].tolist() == [1.0, 1.0]
    assert cache.keys[0].float().view(-1, 2, 8)[1].abs().max().item() == FP8_MAX  # clamped, not NaN
    key, value = torch.randn(5, 2, 8) * 3, torch.randn(5, 2, 8) * 0.01
    cache.write(0, torch.arange(4, 9), key, value, calibrate=True)
    key_scale, value_scale = cache.layer_scales(0)
    assert key_scale.item() == pytest.approx(key.abs().max().item() * 4 / FP8_MAX)
    assert value_scale.item() == pytest.approx(value.abs().max().item() * 4 / FP8_MAX)
    stored = cache.keys[0].view(-1, 2, 8)[4:9].float() * key_scale
    assert relative(stored, key) < FP8_RELATIVE_ERROR
    cache.write(0, torch.arange(4, 9), key * 100, value * 100, calibrate=True)  # a later prefill keeps the scales
    assert cache.layer_scales(0)[0].item() == key_scale.item()
    assert cache.scales[1].tolist() == [1.0, 1.0]  # per layer


@pytest.mark.parametrize("case", FP8_CASES, ids=str)
def test_reference_over_an_fp8_cache_is_close_to_the_exact_cache(case):
    batch, heads, kv_heads, dim, longest, dtype = case
    query, keys, values, layout, cache = fp8_step(batch, heads, kv_heads, dim, longest, getattr(torch, dtype))
    exact = _decode_attention(query, keys, values, layout, None)
    out = _decode_attention(query, cache.keys[0], cache.values[0], layout, None, cache.layer_scales(0))
    assert out.dtype == query.dtype
    assert relative(out, exact) <= FP8_RELATIVE_ERROR
    unscaled = _decode_attention(query, cache.keys[0], cache.values[0], layout, None)  # a read that forgot the scale
    assert relative(unscaled, exact) > FP8_RELATIVE_ERROR


@pytest.fixture(scope="module")
def triton_errors(tmp_path_factory) -> dict[str, list[float]]:
    """Per case: [the Triton kernel against the reference over the same fp8 cache (largest difference), against the
    exact cache (relative)]; the kernel runs under Triton's interpreter in a fresh process (kv_fp8_triton.py)."""
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("fp8-triton")
    steps, expected = {}, {}
    for case in FP8_CASES:
        batch, heads, kv_heads, dim, longest, dtype = case
        query, keys, values, layout, cache = fp8_step(batch, heads, kv_heads, dim, longest, getattr(torch, dtype))
        exact = _decode_attention(query, keys, values, layout, None)
        reference = _decode_attention(query, cache.keys[0], cache.values[0], layout, None, cache.layer_scales(0))
        expected[str(case)] = exact, reference
        tables, lengths, scale = layout.decode_blocks, layout.decode_lengths(), dim**-0.5
        inputs = dict(query=query, keys=cache.keys[0], values=cache.values[0], tables=tables, lengths=lengths)
        steps[str(case)] = dict(inputs, scale=scale, scales=cache.scales[0])
    torch.save(steps, folder / "in.pt")
    result = subprocess.run(
        [sys.executable, "-m", "tests.unit.kv_fp8_triton", str(folder / "in.pt"), str(folder / "out.pt")],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = torch.load(folder / "out.pt")
    errors = {}
    for name, (exact, reference) in expected.items():
        out = outputs[name]
        errors[name] = [(out.float() - reference.float()).abs().max().item(), relative(out, exact)]
    return errors


@pytest.mark.parametrize("case", FP8_CASES, ids=str)
def test_triton_kernel_dequantizes_as_the_reference_does(triton_errors, case):
    same_cache, against_exact = triton_errors[str(case)]
    assert same_cache <= SAME_CACHE_TOLERANCE[case[-1]]
    assert against_exact <= FP8_RELATIVE_ERROR


@pytest.fixture(scope="module")
def cpu_kernel():
    from serve.engine.decode_backends import KERNEL_FOLDER
    from serve.engine.paged_cpu import load_paged_kernel

    found, why_not = load_paged_kernel(str(KERNEL_FOLDER))
    if found is None:
        pytest.skip(f"no CPU paged kernel on this machine: {why_not}")
    return found


@pytest.mark.parametrize("case", FP8_CASES, ids=str)
def test_cpu_kernel_reads_an_fp8_cache_as_the_reference_does(cpu_kernel, case):
    batch, heads, kv_heads, dim, longest, dtype = case
    query, keys, values, layout, cache = fp8_step(batch, heads, kv_heads, dim, longest, getattr(torch, dtype))
    scales = cache.layer_scales(0)
    reference = _decode_attention(query, cache.keys[0], cache.values[0], layout, None, scales)
    tables, lengths = layout.decode_blocks, layout.decode_lengths()
    out = cpu_kernel.decode(query, cache.keys[0], cache.values[0], tables, lengths, dim**-0.5, scales)
    assert out.dtype == query.dtype
    assert (out.float() - reference.float()).abs().max().item() <= SAME_CACHE_TOLERANCE[dtype]
    assert relative(out, _decode_attention(query, keys, values, layout, None)) <= FP8_RELATIVE_ERROR


def test_auto_on_the_cpu_reads_an_fp8_cache_in_place_and_a_float16_query_through_the_reference(cpu_kernel):
    from serve.engine.attention import _decode_kernels
    from serve.engine.decode_backends import install_decode_backend

    query, keys, values, layout, cache = fp8_step(2, 8, 2, 64, 40, torch.float32)
    report = install_decode_backend(cache, "auto")
    assert report.backend == "cpu"
    decode = _decode_kernels[cache]
    scales = cache.layer_scales(0)
    half = decode(query.half(), cache.keys[0], cache.values[0], layout, None, scales)
    assert half.dtype == torch.float16
    reference = _decode_attention(query.half(), cache.keys[0], cache.values[0], layout, None, scales)
    assert torch.equal(half, reference)


PROMPTS = ["The capital of France is", "Once upon a time, there was", "def fibonacci(n):", "1, 2, 3, 4,"]
PROMPTS += ["Hello, how are you", "The quick brown fox", "In 1492, Columbus", "Water boils at"]


def greedy_tokens(engine) -> list[list[int]]:
    """Each prompt's 32 greedy tokens, all submitted at once (one batch)."""
    from serve.engine import Request, SamplingParams

    encode = lambda text: engine.tokenizer(text)["input_ids"]  # noqa: E731
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    streams = [engine.submit(Request(encode(prompt), params)) for prompt in PROMPTS]
    return [[event.token_id for event in stream if event.token_id is not None] for stream in streams]


def test_an_engine_with_an_fp8_cache_completes_and_mostly_agrees_with_the_exact_cache(tiny_settings, tiny_engine):
    """The measure: the share of the 8 x 32 greedy tokens that come before each prompt's first difference from the
    exact (float32) cache's tokens; at least 60% (a random tiny model's logits are close together, so one fp8
    rounding can flip a later greedy choice; 80% here). Prompts are prefilled 4 tokens a step, so later chunks read
    their prefix back from the fp8 cache."""
    from dataclasses import replace

    from serve.app import create_app
    from serve.wiring import single_engine

    settings = replace(tiny_settings, max_batch_total_tokens=4096, max_batch_prefill_tokens=4, kv_cache_dtype="fp8")
    engine = single_engine(settings).start()
    assert engine.wait_ready(120), engine.load_error
    try:
        fp8 = greedy_tokens(engine)
        info = create_app(settings, engine).test_client().get("/info").get_json()
    finally:
        engine.stop()
    exact = greedy_tokens(tiny_engine)
    assert all(len(tokens) == 32 for tokens in fp8)
    agreed = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in zip(exact, fp8)]
    assert sum(agreed) / (32 * len(PROMPTS)) >= 0.6
    assert info["kv_cache_dtype"] == "float8_e4m3fn"
    exact_info = create_app(tiny_settings, tiny_engine).test_client().get("/info").get_json()
    assert exact_info["kv_cache_dtype"] == "float32"
