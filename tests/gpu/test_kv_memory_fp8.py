"""On CUDA: the KV cache sized from a measured dummy step (GPU_MEMORY_UTILIZATION), every batch bucket's narrowest
and widest CUDA graph self-checked, and the Triton kernel over an fp8 cache against the reference (skipped without
a GPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from serve.engine.attention import _decode_attention
from serve.engine.kv_cache import CacheShape, PagedKVCache
from serve.engine.kv_memory import cache_bytes_for, profile_devices
from serve.engine.types import EngineConfig
from tests.unit.kv_fp8_cases import fp8_step, relative

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda:0")


def tiny_model(layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(DEVICE, torch.bfloat16).eval()


def test_the_dummy_steps_measure_a_peak_that_grows_with_the_prefill_budget_and_leave_room():
    model = tiny_model()
    shape = CacheShape.of(model.config, torch.bfloat16)
    devices = [DEVICE] * shape.layers
    [small] = profile_devices(model, shape, devices, EngineConfig(max_batch_prefill_tokens=256), (64, 128, 2048))
    [large] = profile_devices(model, shape, devices, EngineConfig(max_batch_prefill_tokens=2048), (64, 128, 2048))
    total = torch.cuda.mem_get_info(DEVICE)[1]
    assert large.total == total and 0 < large.in_use < total
    assert 0 < small.peak_step < large.peak_step and large.graph_reserve > 0
    room = cache_bytes_for([large], 0.9, shape.layers)
    assert 0 < room < total * 0.9 - large.in_use


def test_every_batch_buckets_narrowest_and_widest_graph_is_checked_and_kept():
    from serve.engine.runner import ModelRunner

    model = tiny_model()
    shape = CacheShape.of(model.config, torch.bfloat16)
    cache = PagedKVCache(shape, 64, 16, DEVICE)
    runner = ModelRunner(model, cache, None, max_batch=16, max_blocks=32)
    report = runner.capture_graphs()
    assert report.enabled and report.dropped == [], report
    assert report.checked == 2 * len(runner.static.batches)
    assert len(report.shapes) == len(runner.static.batches) * len(runner.static.widths)


@pytest.mark.parametrize("case", [(8, 32, 8, 128, 2048, torch.bfloat16), (1, 32, 8, 128, 8192, torch.bfloat16)])
def test_triton_kernel_over_an_fp8_cache_matches_the_reference_on_cuda(case):
    from serve.engine.paged_triton import paged_decode

    query, keys, values, layout, cache = fp8_step(*case)
    query, keys, values, layout = query.to(DEVICE), keys.to(DEVICE), values.to(DEVICE), layout.on(DEVICE)
    stored_keys, stored_values = cache.keys[0].to(DEVICE), cache.values[0].to(DEVICE)
    both = cache.scales[0].to(DEVICE)
    scales = (both[0:1], both[1:2])  # views of one tensor, as PagedKVCache.layer_scales hands them
    exact = _decode_attention(query, keys, values, layout, None)
    reference = _decode_attention(query, stored_keys, stored_values, layout, None, scales)
    out = paged_decode(
        query, stored_keys, stored_values, layout.decode_blocks, layout.decode_lengths(), 128**-0.5, scales
    )
    assert (out.float() - reference.float()).abs().max().item() <= 2e-2
    assert relative(out, exact) <= 0.06
