"""Paged prefill attention in Triton: every prompt chunk of a step attends in one launch, reading K/V in place.

A chunk's queries attend causally over its sequence's cached prefix and its own keys, which ``attend`` has already
written into the cache: both are read through the chunk's block table where they lie, so nothing is gathered into a
copy and no dense mask is built (paged_triton_prefill_kernels.py). Chunks of any lengths share the launch: the
grid is (chunk, KV head, query tile) sized for the longest chunk, and each program reads its chunk's first step row,
length and cached-before count from ``ChunkBatch.spans``. Grouped-query heads share each K/V load.

Triton is imported on first use: ``prefill_unusable`` says why the kernel cannot run (not installed, no CUDA device
and no interpreter, a cache dtype it does not take) and the caller keeps the gathering reference. Under
``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (the tests do).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Optional

import torch

from serve.engine.attention import ChunkBatch, Scales, StepLayout
from serve.engine.kv_cache import is_fp8
from serve.engine.paged_triton import cache_operands

ROWS = 64  # query rows per program: ROWS // group tokens times the group's heads
TILE = 64  # keys per inner step of a program
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOG2_E = 1.4426950408889634


def prefill_unusable(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the Triton prefill kernel cannot run over a ``dtype`` cache on ``device`` (None when it can)."""
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    interpreted = getattr(getattr(getattr(triton, "knobs", None), "runtime", None), "interpret", False)
    if device.type != "cuda" and not (device.type == "cpu" and interpreted):
        return f"no CUDA device ({device.type})"
    if dtype not in DTYPES and not is_fp8(dtype):
        return f"the Triton prefill kernel takes float32, bfloat16, float16 or fp8 caches, not {str(dtype)[6:]}"
    return None


def paged_prefill(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    chunks: ChunkBatch,
    scale: float,
    out: torch.Tensor,
    kv_scales: Scales = None,
) -> None:
    """Write into ``out`` [tokens, heads, dim] the attention of each chunk's rows of ``query`` [tokens, heads, dim]
    over keys/values [blocks, block_size, kv_heads, dim] (the chunk's own keys written already). ``kv_scales``: an
    fp8 cache's (key scale, value scale), views of one two-element float32 tensor (``PagedKVCache.layer_scales``)."""
    _, heads, dim = query.shape
    keys, values, fp8, block_size, kv_heads = cache_operands(keys, values, kv_scales)
    group = heads // kv_heads
    rows = max(ROWS, _pow2(group))
    tokens = rows // group  # query tokens per program; programs past their chunk's end return at once
    grid = (chunks.spans.shape[1], kv_heads, -(-chunks.longest // tokens))
    upcast = keys.dtype == torch.bfloat16 and keys.device.type != "cuda"  # CPU tensors: Triton's interpreter
    starts, lengths, positions = chunks.spans
    scales = kv_scales[0] if fp8 else lengths  # [key scale, value scale] (not read without fp8)
    _kernel()[grid](
        query, keys, values, out, starts, lengths, positions, chunks.tables, scales, scale * LOG2_E,
        *query.stride(), *out.stride(), *keys.stride(), *chunks.tables.stride(),
        GROUP=group, ROWS=rows, TOKENS=tokens, DIM=dim, DIM_PAD=_pow2(dim, 16), BLOCK_SIZE=block_size, TILE=TILE,
        UPCAST=upcast, FP8=fp8,
    )  # fmt: skip


def prefill_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    layout: StepLayout,
    scaling: Optional[float],
    scales: Scales,
    out: torch.Tensor,
) -> None:
    """attention's prefill hook: every chunk of ``layout`` through ``paged_prefill`` (``scales``: an fp8 cache's),
    launched with the tensors' GPU current."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    current = torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext()
    with current:
        paged_prefill(query, keys, values, layout.chunk_batch(), scale, out, scales)


def _pow2(value: int, least: int = 1) -> int:
    """The power of two at or above ``value`` (and ``least``)."""
    return max(least, 1 << (value - 1).bit_length())


@functools.lru_cache(maxsize=1)
def _kernel() -> Any:
    """The kernel, defined on first use (importing triton only then)."""
    from serve.engine.paged_triton_prefill_kernels import chunk_attention

    return chunk_attention
