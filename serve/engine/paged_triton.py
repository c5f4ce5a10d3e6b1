"""Paged decode attention in Triton: each program reads its sequence's K/V where they lie in the block pool.

One program per (sequence, KV head, context split) walks the block table of its slice of the context, loads the
rows of ``TILE`` tokens at a time straight from the cache, and keeps an online softmax for all query heads of its
group (grouped-query heads share each K/V load: nothing is copied per head). A second pass merges the splits. The
split count depends only on the shapes (batch, KV heads, table width), so a CUDA graph captured for a shape keeps
its grid; nothing here reads the device from the host.

Triton is imported on first use: ``triton_unusable`` says why it cannot run (not installed, no CUDA device) and the
caller picks another backend. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (the tests do).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

TILE = 64  # tokens per inner step of a program
MIN_SPLIT_TOKENS = 256  # a split reads at least this many tokens: fewer would spend more on merging than reading
TARGET_PROGRAMS = 264  # enough programs to fill an H100/H200 twice over (132 SMs)


def triton_unusable(device: torch.device) -> Optional[str]:
    """Why the Triton kernel cannot run on ``device`` (None when it can)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type != "cuda":
        return f"no CUDA device ({device.type})"
    return None


def split_count(batch: int, kv_heads: int, max_tokens: int) -> int:
    """How many slices each sequence's context is cut into: enough programs to fill the GPU, each slice at least
    MIN_SPLIT_TOKENS long (a function of the shapes only, so fixed per captured shape)."""
    by_length = max(1, -(-max_tokens // MIN_SPLIT_TOKENS))
    by_occupancy = max(1, -(-TARGET_PROGRAMS // (batch * kv_heads)))
    return min(by_length, by_occupancy)


def paged_decode(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    kv_scales: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> torch.Tensor:
    """query [batch, heads, dim], keys/values [blocks, block_size, kv_heads, dim], tables [batch, width] of block
    ids, lengths [batch] (tokens each sequence sees) -> [batch, heads, dim] in the query's dtype. ``kv_scales``: an
    fp8 cache's (key scale, value scale), views of one two-element float32 tensor (``PagedKVCache.layer_scales``)."""
    batch, heads, dim = query.shape
    keys, values, fp8, block_size, kv_heads = cache_operands(keys, values, kv_scales)
    group = heads // kv_heads
    splits = split_count(batch, kv_heads, tables.shape[1] * block_size)
    split_tokens = -(-(tables.shape[1] * block_size) // (splits * TILE)) * TILE
    partial = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=query.device)
    stats = torch.empty(batch, heads, splits, 2, dtype=torch.float32, device=query.device)
    split_kernel, merge_kernel = _kernels()
    upcast = keys.dtype == torch.bfloat16 and keys.device.type != "cuda"  # CPU tensors: Triton's interpreter
    shape = dict(
        GROUP=group, GROUP_PAD=_pow2(group, 16), DIM=dim, DIM_PAD=_pow2(dim, 16), BLOCK_SIZE=block_size, TILE=TILE
    )
    scales = kv_scales[0] if fp8 else lengths  # [key scale, value scale] (not read without fp8)
    split_kernel[(batch, kv_heads, splits)](
        query, keys, values, tables, lengths, partial, stats, scale, split_tokens, scales,
        *query.stride(), *keys.stride(), *tables.stride(),
        UPCAST=upcast, FP8=fp8, **shape,
    )  # fmt: skip
    out = torch.empty_like(query)
    merge_kernel[(batch, heads)](
        partial, stats, out, splits, *out.stride(), DIM=dim, DIM_PAD=_pow2(dim), SPLITS_PAD=_pow2(splits),
    )  # fmt: skip
    return out


def _pow2(value: int, least: int = 1) -> int:
    """The power of two at or above ``value`` (and ``least``)."""
    return max(least, 1 << (value - 1).bit_length())


@functools.lru_cache(maxsize=1)
def _kernels() -> tuple[Any, Any]:
    """The two kernels, defined on first use (importing triton only then)."""
    from serve.engine.paged_triton_kernels import merge_splits, split_attention

    return split_attention, merge_splits


def cache_operands(
    keys: torch.Tensor, values: torch.Tensor, kv_scales: Optional[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor, bool, int, int]:
    """(keys, values as the kernels read them: an fp8 cache as its e4m3 bytes, which they widen themselves; whether
    fp8; block size; KV heads). ValueError when keys and values do not share one layout."""
    fp8 = kv_scales is not None
    if fp8:
        keys, values = keys.view(torch.uint8), values.view(torch.uint8)
    _, block_size, kv_heads, _ = keys.shape
    if values.stride() != keys.stride():
        raise ValueError("keys and values must share one layout")
    return keys, values, fp8, block_size, kv_heads
