"""The Triton kernel of paged prefill attention (imported only by serve.engine.paged_triton_prefill, on first use).

``chunk_attention``: program (chunk, KV head, query tile) takes ``ROWS`` query rows of the chunk: ``TOKENS``
(``ROWS // GROUP``) consecutive tokens times the ``GROUP`` query heads that read this KV head (row r is token
r // GROUP, head r % GROUP), so each K/V tile loaded serves every head of the group. It walks the keys from the
sequence's first position up to its last query's position, ``TILE`` tokens at a time, reading each key's row at
``table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE``: the cached prefix and the chunk's own keys (already
written) alike. Query row at position q sees key p when p <= q. Online softmax in base 2 (``scale`` is the softmax
scale times log2(e)) with float32 sums; ``UPCAST`` multiplies in float32 (Triton's interpreter gets bfloat16
``tl.dot`` wrong; on a GPU bfloat16 and float16 go through the tensor cores as they are). ``FP8``: the cache holds
float8 e4m3 bytes, widened and scaled by the decode kernels' ``_rows`` (serve/engine/paged_triton_kernels.py).
"""

from __future__ import annotations

import triton
import triton.language as tl

from serve.engine.paged_triton_kernels import FP8_EXPONENT_SHIFT, _rows


@triton.jit
def chunk_attention(
    q_ptr, k_ptr, v_ptr, out_ptr, starts_ptr, lengths_ptr, positions_ptr, tables_ptr, scales_ptr, scale,
    q_token, q_head, q_dim, out_token, out_head, out_dim, kv_block, kv_offset, kv_head, kv_dim,
    table_chunk, table_block,
    GROUP: tl.constexpr, ROWS: tl.constexpr, TOKENS: tl.constexpr, DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, UPCAST: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    chunk, head, part = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(lengths_ptr + chunk)
    first_token = part * TOKENS
    if first_token >= length:  # the grid is sized for the longest chunk
        return
    start, position = tl.load(starts_ptr + chunk), tl.load(positions_ptr + chunk)
    rows, dims = tl.arange(0, ROWS), tl.arange(0, DIM_PAD)
    token = first_token + rows // GROUP
    row_ok = (rows < TOKENS * GROUP) & (token < length)
    dim_ok = dims < DIM
    q_heads = head * GROUP + rows % GROUP
    io_ok = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(q_ptr + (start + token)[:, None] * q_token + q_heads[:, None] * q_head + dims[None, :] * q_dim,
                mask=io_ok, other=0.0)  # fmt: skip
    seen = position + token  # each row's own position: it sees keys 0..seen (every row sees key 0)
    kv_end = position + tl.minimum(first_token + TOKENS, length)
    table = tables_ptr + chunk * table_chunk
    best = tl.full([ROWS], float("-inf"), tl.float32)
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DIM_PAD], tl.float32)
    k_factor, v_factor = 1.0, 1.0
    if FP8:  # scales_ptr: [key scale, value scale] of the layer
        k_factor = tl.load(scales_ptr) * FP8_EXPONENT_SHIFT
        v_factor = tl.load(scales_ptr + 1) * FP8_EXPONENT_SHIFT
    for first in range(0, kv_end, TILE):
        keys_at = first + tl.arange(0, TILE)
        key_ok = keys_at < kv_end
        blocks = tl.load(table + (keys_at // BLOCK_SIZE) * table_block, mask=key_ok, other=0)
        at = blocks * kv_block + (keys_at % BLOCK_SIZE) * kv_offset + head * kv_head
        tile_ok = key_ok[:, None] & dim_ok[None, :]
        k = _rows(k_ptr, at[:, None] + dims[None, :] * kv_dim, tile_ok, k_factor, UPCAST, FP8)
        scores = tl.dot(q.to(k.dtype), tl.trans(k), input_precision="ieee") * scale
        scores = tl.where(key_ok[None, :] & (keys_at[None, :] <= seen[:, None]), scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        rescale = tl.exp2(best - new_best)
        weights = tl.exp2(scores - new_best[:, None])
        total = total * rescale + tl.sum(weights, 1)
        v = _rows(v_ptr, at[:, None] + dims[None, :] * kv_dim, tile_ok, v_factor, UPCAST, FP8)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision="ieee")
        best = new_best
    out = acc / total[:, None]
    at_out = (start + token)[:, None] * out_token + q_heads[:, None] * out_head + dims[None, :] * out_dim
    tl.store(out_ptr + at_out, out.to(out_ptr.dtype.element_ty), mask=io_ok)
