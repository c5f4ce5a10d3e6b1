"""On CUDA: the Triton paged decode kernel against the gathering reference over the whole matrix (lengths 1 to
8,192, KV heads 1/2/8, head dim 64/128, float32/bfloat16/float16), without a host sync, and replayed from a CUDA
graph after its inputs changed in place (skipped without a GPU)."""

from __future__ import annotations

import itertools

import pytest
import torch

from serve.engine.attention import StepLayout, _decode_attention
from tests.unit.paged_cases import random_step

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda:0")
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}
MATRIX = list(itertools.product([1, 2, 8], [64, 128], [torch.float32, torch.bfloat16, torch.float16]))


def _on_cuda(query, keys, values, layout):
    return query.to(DEVICE), keys.to(DEVICE), values.to(DEVICE), layout.on(DEVICE)


@pytest.mark.parametrize("kv_heads, dim, dtype", MATRIX, ids=str)
@pytest.mark.parametrize("batch, longest", [(8, 300), (1, 8192), (32, 2048)])
def test_triton_kernel_matches_the_reference_on_cuda(batch, longest, kv_heads, dim, dtype):
    from serve.engine.paged_triton import paged_decode

    query, keys, values, layout = _on_cuda(*random_step(batch, 4 * kv_heads, kv_heads, dim, longest, dtype, batch))
    expected = _decode_attention(query, keys, values, layout, None)
    lengths = layout.decode_lengths()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # no hidden host read
    try:
        out = paged_decode(query, keys, values, layout.decode_blocks, lengths, dim**-0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (out.float() - expected.float()).abs().max().item() <= TOLERANCE[dtype]


def test_a_captured_graph_replays_new_tables_and_lengths():
    from serve.engine.paged_triton import paged_decode

    query, keys, values, layout = _on_cuda(*random_step(16, 32, 8, 128, 1024, torch.bfloat16, seed=1))
    tables, lengths = layout.decode_blocks.clone(), layout.decode_lengths().clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            paged_decode(query, keys, values, tables, lengths, 128**-0.5)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode(query, keys, values, tables, lengths, 128**-0.5)
    new_query, _, _, new_layout = _on_cuda(*random_step(16, 32, 8, 128, 1024, torch.bfloat16, seed=2))
    new_layout = StepLayout(new_layout.rows, 16, new_layout.decode_blocks.flip(0), new_layout.decode_mask, [])
    query.copy_(new_query)
    tables.copy_(new_layout.decode_blocks)
    lengths.copy_(new_layout.decode_lengths())
    graph.replay()
    expected = _decode_attention(query, keys, values, new_layout, None)
    assert (out.float() - expected.float()).abs().max().item() <= TOLERANCE[torch.bfloat16]
