"""On CUDA: the Triton paged prefill kernel against the gathering reference through ``attend`` (KV heads 1/2/8, head
dim 64/128, float32/bfloat16/float16, an fp8 cache; steps of several chunks behind decode tokens, and one long chunk
after a long cached prefix), without a host sync once the step's chunk batch is built (skipped without a GPU)."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.unit.test_paged_prefill_triton import drawn_spans, random_step

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float8_e4m3fn: 1e-4}
MATRIX = list(itertools.product([1, 2, 8], [64, 128], [torch.float32, torch.bfloat16, torch.float16]))


def _errors(kv_heads: int, dim: int, dtype: torch.dtype, spans: list[tuple[int, int]]) -> float:
    """Largest difference between ``attend`` with the kernel and with the reference over one random step."""
    from serve.engine.attention import active_step, attend, use_prefill_kernel
    from serve.engine.paged_triton_prefill import prefill_attention

    cache, layout, query, key, value = random_step(kv_heads, dim, dtype, spans, 7, 4 * kv_heads, "cuda")
    use_prefill_kernel(cache, None)
    with active_step(cache, layout):
        expected = attend(0, query, key, value, None)
    layout.chunk_batch()  # built once a step, before the layers run: its one upload is not the kernel's
    out = torch.full_like(query, float("nan"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # no hidden host read in the launch
    try:
        prefill_attention(query, cache.keys[0], cache.values[0], layout, None, out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows = slice(layout.decode_count, None)  # the kernel writes the chunks' rows only
    return (out[rows].float() - expected[rows].float()).abs().max().item()


@pytest.mark.parametrize("kv_heads, dim, dtype", MATRIX, ids=str)
def test_triton_prefill_matches_the_reference_on_cuda(kv_heads, dim, dtype):
    assert _errors(kv_heads, dim, dtype, drawn_spans(6, kv_heads)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_long_chunk_after_a_long_cached_prefix(dtype):
    assert _errors(8, 128, dtype, [(2048, 2048), (0, 1024), (4000, 3)]) <= TOLERANCE[dtype]


@pytest.mark.parametrize("kv_heads", [2, 8])
def test_an_fp8_cache_is_widened_in_the_kernel(kv_heads):
    """float32 queries over an fp8 cache: both paths widen the same bytes (a first chunk's reference would attend
    over its exact keys instead, so every chunk here has a cached prefix)."""
    spans = [(position, length) for position, length in drawn_spans(6, kv_heads) if position] + [(1500, 500)]
    assert _errors(kv_heads, 128, torch.float8_e4m3fn, spans) <= TOLERANCE[torch.float8_e4m3fn]
