"""Random decode steps over an fp8 KV cache (KV_CACHE_DTYPE=fp8), for the fp8 tests: the same keys and values
stored exactly and through ``PagedKVCache.write`` as float8 e4m3 with calibrated per-layer scales."""

from __future__ import annotations

import torch

from serve.engine.kv_cache import CacheShape, PagedKVCache
from tests.unit.paged_cases import BLOCK_SIZE, random_step

FP8_CASES = (  # batch, heads, kv_heads, dim, longest, dtype (of the query and the exact cache)
    (3, 8, 2, 64, 40, "float32"),
    (2, 8, 8, 128, 300, "float32"),
    (2, 8, 2, 64, 200, "bfloat16"),
    (1, 4, 1, 128, 2048, "float32"),
)


def fp8_step(batch: int, heads: int, kv_heads: int, dim: int, longest: int, dtype: torch.dtype, seed: int = 0):
    """(query, exact keys, exact values, layout, fp8 cache holding the same keys and values in layer 0)."""
    query, keys, values, layout = random_step(batch, heads, kv_heads, dim, longest, dtype, seed)
    cache = PagedKVCache(
        CacheShape(1, kv_heads, dim, torch.float8_e4m3fn), keys.shape[0], BLOCK_SIZE, torch.device("cpu")
    )
    rows = torch.arange(keys.shape[0] * BLOCK_SIZE)
    cache.write(0, rows, keys.flatten(0, 1), values.flatten(0, 1), calibrate=True)
    return query, keys, values, layout, cache


def relative(out: torch.Tensor, expected: torch.Tensor) -> float:
    return ((out.float() - expected.float()).norm() / expected.float().norm()).item()


def triton_fp8_errors() -> dict[str, list[float]]:
    """Per case: [Triton fp8 against the reference over the same fp8 cache (largest difference), Triton fp8
    against the exact cache (relative)]."""
    from serve.engine.attention import _decode_attention
    from serve.engine.paged_triton import paged_decode

    errors = {}
    for case in FP8_CASES:
        batch, heads, kv_heads, dim, longest, dtype = case
        query, keys, values, layout, cache = fp8_step(batch, heads, kv_heads, dim, longest, getattr(torch, dtype))
        scales = cache.layer_scales(0)
        exact = _decode_attention(query, keys, values, layout, None)
        reference = _decode_attention(query, cache.keys[0], cache.values[0], layout, None, scales)
        lengths = layout.decode_lengths()
        out = paged_decode(query, cache.keys[0], cache.values[0], layout.decode_blocks, lengths, dim**-0.5, scales)
        errors[str(case)] = [(out.float() - reference.float()).abs().max().item(), relative(out, exact)]
    return errors


if __name__ == "__main__":  # run under TRITON_INTERPRET=1 in a fresh process (Triton reads it when imported)
    import json

    print(json.dumps(triton_fp8_errors()))
