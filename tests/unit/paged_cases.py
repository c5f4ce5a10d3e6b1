"""Random decode steps over a paged KV cache, for the paged attention kernels' tests."""

from __future__ import annotations

import torch

from serve.engine.attention import StepLayout

BLOCK_SIZE = 16


def random_step(
    batch: int, heads: int, kv_heads: int, dim: int, longest: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StepLayout]:
    """query [batch, heads, dim], a pool of keys/values [blocks, 16, kv_heads, dim] holding random values, and the
    layout of ``batch`` sequences with random, disjoint block tables: the first sees ``longest`` tokens, the last
    one token, the others a random count."""
    generator = torch.Generator().manual_seed(seed)
    width = -(-longest // BLOCK_SIZE)
    blocks = batch * width + 2  # the scratch block 0 and one never used
    keys = torch.randn(blocks, BLOCK_SIZE, kv_heads, dim, generator=generator).to(dtype)
    values = torch.randn(blocks, BLOCK_SIZE, kv_heads, dim, generator=generator).to(dtype)
    tables = (torch.randperm(blocks - 1, generator=generator)[: batch * width] + 1).view(batch, width)
    lengths = torch.randint(1, longest + 1, (batch,), generator=generator)
    lengths[0] = longest
    if batch > 1:
        lengths[-1] = 1
    mask = torch.arange(width * BLOCK_SIZE)[None, :] < lengths[:, None]
    query = torch.randn(batch, heads, dim, generator=generator).to(dtype)
    layout = StepLayout(torch.zeros(batch, dtype=torch.long), batch, tables, mask[:, None, None, :], [])
    return query, keys, values, layout


TRITON_CASES = (  # batch, heads, kv_heads, dim, longest, dtype
    (3, 8, 2, 64, 40, "float32"),  # lengths 1..40, GQA group 4
    (2, 9, 3, 64, 700, "float32"),  # SmolLM2's heads: a group of 3 (padded inside the kernel)
    (2, 8, 8, 128, 300, "float16"),  # no grouping, head dim 128
    (2, 8, 2, 64, 200, "bfloat16"),
    (1, 4, 1, 128, 8192, "bfloat16"),  # one long sequence: 32 splits merged
)


def triton_errors() -> dict[str, float]:
    """Largest difference between the Triton kernel and the reference for each case (and a strided query)."""
    from serve.engine.attention import _decode_attention
    from serve.engine.paged_triton import paged_decode

    errors = {}
    for case in TRITON_CASES:
        batch, heads, kv_heads, dim, longest, dtype = case
        query, keys, values, layout = random_step(batch, heads, kv_heads, dim, longest, getattr(torch, dtype), longest)
        expected = _decode_attention(query, keys, values, layout, None)
        out = paged_decode(query, keys, values, layout.decode_blocks, layout.decode_lengths(), dim**-0.5)
        errors[str(case)] = (out.float() - expected.float()).abs().max().item() if out.dtype == expected.dtype else 1.0
    query, keys, values, layout = random_step(2, 6, 2, 64, 50, torch.float32, seed=1)
    keys[layout.decode_blocks[0, -1]] = 1e4  # the first sequence's last block: past its length once it is 17
    lengths = torch.tensor([17, 50])
    mask = torch.arange(layout.decode_mask.shape[-1])[None, :] < lengths[:, None]
    reference = StepLayout(layout.rows, 2, layout.decode_blocks, mask[:, None, None, :], [])
    expected = _decode_attention(query, keys, values, reference, None)
    strided = query.transpose(0, 1).contiguous().transpose(0, 1)  # as transformers hands queries over
    out = paged_decode(strided, keys, values, layout.decode_blocks, reference.decode_lengths(), 64**-0.5)
    errors["strided"] = (out - expected).abs().max().item()
    return errors


if __name__ == "__main__":  # run under TRITON_INTERPRET=1 in a fresh process (Triton reads it when imported)
    import json

    print(json.dumps(triton_errors()))
