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
