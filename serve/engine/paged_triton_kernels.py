"""The Triton kernels of paged decode attention (imported only by serve.engine.paged_triton, on first use).

``split_attention``: program (sequence, KV head, split) runs an online softmax over its split's tokens for the
group's query heads (padded to at least 16 rows for ``tl.dot``), reading each token's K/V row at
``table[token // BLOCK_SIZE] * BLOCK_SIZE + token % BLOCK_SIZE``; it writes the unnormalised output and its
(max, sum) per head. ``UPCAST`` multiplies in float32 (Triton's interpreter gets bfloat16 ``tl.dot`` wrong; on a
GPU bfloat16 and float16 go through the tensor cores as they are). ``FP8``: the cache holds float8 e4m3 bytes
(KV_CACHE_DTYPE=fp8), widened to float32 by their bits (``_fp8_rows``: the same on every GPU and in the
interpreter) and multiplied by the layer's key or value scale; the products then run in float32.
``merge_splits``: program (sequence, query head) rescales and sums the splits.
"""

from __future__ import annotations

import triton
import triton.language as tl


FP8_EXPONENT_SHIFT = tl.constexpr(1.329227995784916e36)  # 2 ** 120: e4m3's exponent bias (7) moved to float32's (127)


@triton.jit
def _fp8_rows(bits_ptr, offsets, mask, factor):
    """float8 e4m3 (fn) bytes as float32 times ``factor``: sign, exponent and mantissa placed in a float32 word whose
    value is 2**-120 times the e4m3 value (subnormals included), then scaled (no NaN is ever stored)."""
    bits = tl.load(bits_ptr + offsets, mask=mask, other=0).to(tl.uint32)
    word = ((bits & 0x7F) << 20) | ((bits & 0x80) << 24)
    return word.to(tl.float32, bitcast=True) * factor


@triton.jit
def _rows(ptr, offsets, mask, factor, UPCAST: tl.constexpr, FP8: tl.constexpr):
    """K or V rows of a tile: fp8 widened and scaled, float32 where UPCAST, else as stored."""
    if FP8:
        rows = _fp8_rows(ptr, offsets, mask, factor)
    else:
        rows = tl.load(ptr + offsets, mask=mask, other=0.0)
        rows = rows.to(tl.float32) if UPCAST else rows
    return rows


@triton.jit
def split_attention(
    q_ptr, k_ptr, v_ptr, tables_ptr, lengths_ptr, partial_ptr, stats_ptr, scale, split_tokens, scales_ptr,
    q_seq, q_head, q_dim, kv_block, kv_offset, kv_head, kv_dim, table_seq, table_block,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    seq, head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    heads, splits = tl.num_programs(1) * GROUP, tl.num_programs(2)
    start = split * split_tokens
    end = tl.minimum(start + split_tokens, tl.load(lengths_ptr + seq))
    rows, dims = tl.arange(0, GROUP_PAD), tl.arange(0, DIM_PAD)
    row_ok, dim_ok = rows < GROUP, dims < DIM
    q_heads = head * GROUP + rows
    q = tl.load(
        q_ptr + seq * q_seq + q_heads[:, None] * q_head + dims[None, :] * q_dim,
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    k_factor, v_factor = 1.0, 1.0
    if FP8:  # scales_ptr: [key scale, value scale] of the layer
        k_factor = tl.load(scales_ptr) * FP8_EXPONENT_SHIFT
        v_factor = tl.load(scales_ptr + 1) * FP8_EXPONENT_SHIFT
    for first in range(start, end, TILE):
        tokens = first + tl.arange(0, TILE)
        token_ok = tokens < end
        blocks = tl.load(tables_ptr + seq * table_seq + (tokens // BLOCK_SIZE) * table_block, mask=token_ok, other=0)
        at = blocks * kv_block + (tokens % BLOCK_SIZE) * kv_offset + head * kv_head
        tile_ok = token_ok[:, None] & dim_ok[None, :]
        k = _rows(k_ptr, at[:, None] + dims[None, :] * kv_dim, tile_ok, k_factor, UPCAST, FP8)
        scores = tl.dot(q.to(k.dtype), tl.trans(k), input_precision="ieee") * scale
        scores = tl.where(token_ok[None, :], scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        rescale = tl.exp(best - new_best)
        weights = tl.exp(scores - new_best[:, None])
        total = total * rescale + tl.sum(weights, 1)
        v = _rows(v_ptr, at[:, None] + dims[None, :] * kv_dim, tile_ok, v_factor, UPCAST, FP8)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision="ieee")
        best = new_best
    slot = (seq * heads + q_heads) * splits + split
    tl.store(partial_ptr + slot[:, None] * DIM + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(stats_ptr + slot * 2, best, mask=row_ok)
    tl.store(stats_ptr + slot * 2 + 1, total, mask=row_ok)


@triton.jit
def merge_splits(
    partial_ptr, stats_ptr, out_ptr, splits, out_seq, out_head, out_dim,
    DIM: tl.constexpr, DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    seq, head, heads = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
    parts, dims = tl.arange(0, SPLITS_PAD), tl.arange(0, DIM_PAD)
    part_ok, dim_ok = parts < splits, dims < DIM
    slot = (seq * heads + head) * splits + parts
    best = tl.load(stats_ptr + slot * 2, mask=part_ok, other=float("-inf"))
    total = tl.load(stats_ptr + slot * 2 + 1, mask=part_ok, other=0.0)
    weight = tl.exp(best - tl.max(best, 0))  # the first split always holds a token: the max is finite
    acc = tl.load(partial_ptr + slot[:, None] * DIM + dims[None, :], mask=part_ok[:, None] & dim_ok[None, :], other=0.0)
    out = tl.sum(acc * weight[:, None], 0) / tl.sum(total * weight, 0)
    tl.store(out_ptr + seq * out_seq + head * out_head + dims * out_dim, out.to(out_ptr.dtype.element_ty), mask=dim_ok)
