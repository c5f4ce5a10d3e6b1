"""GPU_MEMORY_UTILIZATION: the KV cache sized from a measured dummy step. The arithmetic with given numbers, the
widest step's shape, and the measurement's sequence over a tiny model on the CPU with a fake ``torch.cuda``."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from serve.engine.kv_cache import CacheShape
from serve.engine.kv_memory import (
    GRAPH_OVERHEAD_BYTES,
    DeviceBudget,
    KVCacheTooSmall,
    cache_bytes_for,
    cache_room,
    check_room,
    profile_devices,
    widest_step,
)
from serve.engine.types import EngineConfig

GIB = 1024**3


def test_the_cache_gets_the_share_left_after_weights_peak_step_and_graphs():
    h100 = DeviceBudget("cuda:0", 80 * GIB, 16 * GIB, 2 * GIB, 1 * GIB, layers=32)
    assert cache_bytes_for([h100], 0.9, 32) == 72 * GIB - 16 * GIB - 2 * GIB - 1 * GIB
    assert cache_bytes_for([h100], 0.5, 32) == 40 * GIB - 19 * GIB
    assert cache_bytes_for([DeviceBudget("cuda:0", 80 * GIB, 80 * GIB, GIB, 0, 32)], 0.9, 32) == 0  # nothing left


def test_with_layers_split_over_gpus_the_tightest_gpu_per_layer_sets_the_size():
    first = DeviceBudget("cuda:0", 40 * GIB, 16 * GIB, 2 * GIB, 2 * GIB, layers=20)  # 20 GiB for 20 layers
    second = DeviceBudget("cuda:1", 40 * GIB, 10 * GIB, 2 * GIB, 0, layers=12)  # 28 GiB for 12 layers
    assert cache_bytes_for([first, second], 1.0, 32) == 32 * GIB  # 1 GiB a layer, as the first GPU allows


def test_a_cache_smaller_than_one_sequence_fails_the_load_naming_the_settings():
    shape = CacheShape(32, 8, 128, torch.bfloat16)  # 128 KiB a token
    config = EngineConfig(gpu_memory_utilization=0.5)
    check_room(4096 * shape.bytes_per_token, shape, 4096, config)  # exactly one sequence: enough
    with pytest.raises(KVCacheTooSmall, match=r"GPU_MEMORY_UTILIZATION \(now 0.5\).*KV_CACHE_DTYPE=fp8"):
        check_room(4095 * shape.bytes_per_token, shape, 4096, config)


def test_the_widest_step_is_the_full_decode_batch_beside_a_prefill_chunk_over_a_full_prefix():
    step = widest_step(max_batch=3, width=8, block_size=16, prefill_tokens=40, total=128)
    assert len(step.ids) == 3 + 40 and step.decode_tables == [[0] * 8] * 3 and step.decode_lengths == [128] * 3
    assert step.chunks == [(3, 43, 88, [0] * 8)]  # 88 tokens cached before it: it ends at the full length
    assert step.positions[3:] == list(range(88, 128)) and max(step.rows) < 16  # the scratch block only
    assert step.logit_rows == [0, 1, 2, 42]
    assert widest_step(2, 1, 16, 512, 16).chunks == [(2, 18, 0, [0])]  # a budget above the context: one sequence


def test_off_cuda_or_with_max_batch_total_tokens_nothing_is_measured():
    shape = CacheShape(2, 2, 16, torch.float32)
    room = cache_room(None, shape, [torch.device("cpu")] * 2, EngineConfig(), 64, 4)
    assert 0 < room <= 8 * GIB  # the CPU's rule, as before
    override = EngineConfig(max_batch_total_tokens=1000)
    assert cache_room(None, shape, [torch.device("cuda")] * 2, override, 64, 4) == 0  # no model is run


class FakeCudaMemory:
    """torch.cuda's memory calls over one fake GPU: 80 GiB, 20 GiB in use; each step peaks 1 GiB above."""

    def __init__(self):
        self.allocated, self.peak, self.resets = 3 * GIB, 3 * GIB, 0

    def mem_get_info(self, device):
        return 60 * GIB, 80 * GIB

    def synchronize(self, device):
        pass

    def empty_cache(self):
        pass

    def reset_peak_memory_stats(self, device):
        self.resets += 1
        self.peak = self.allocated + self.resets * GIB  # the first step peaks 1 GiB above, the second 2

    def memory_allocated(self, device):
        return self.allocated

    def max_memory_allocated(self, device):
        return self.peak


def test_the_dummy_steps_run_the_widest_shapes_and_their_peaks_become_the_terms():
    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    shape = CacheShape.of(config, torch.float32)
    engine = EngineConfig(max_batch_prefill_tokens=24, kv_block_size=16, cuda_graphs=True)
    memory = FakeCudaMemory()
    devices = [torch.device("cpu")] * 2
    [budget] = profile_devices(model, shape, devices, engine, (4, 5, 80), memory)
    assert seen == [torch.Size([1, 4 + 24]), torch.Size([1, 4])]  # the widest mixed step, then the widest decode
    assert budget == DeviceBudget("cpu", 80 * GIB, 20 * GIB, GIB, 2 * GIB + GRAPH_OVERHEAD_BYTES, layers=2)
    seen.clear()
    [without_graphs] = profile_devices(model, shape, devices, EngineConfig(cuda_graphs=False), (4, 5, 80), memory)
    assert len(seen) == 1 and without_graphs.graph_reserve == 0
    model.layer_halves = ()  # a lean model: the pool of its piecewise halves keeps about the widest step's peak
    [lean] = profile_devices(model, shape, devices, engine, (4, 5, 80), FakeCudaMemory())
    assert lean.graph_reserve == 2 * GIB + GRAPH_OVERHEAD_BYTES + GIB


def test_a_draft_models_share_is_taken_before_the_check(monkeypatch):
    """With a draft model the target's cache gets only its share of the measured room, and that share must still
    hold one full-length sequence (else the load fails), not the room before the split."""
    import serve.engine.kv_memory as kv_memory

    shape = CacheShape(32, 8, 128, torch.bfloat16)  # 128 KiB a token
    room = 100 * shape.bytes_per_token  # what the measurement leaves: 100 tokens
    monkeypatch.setattr(kv_memory, "profile_devices", lambda *args: [])
    monkeypatch.setattr(kv_memory, "cache_bytes_for", lambda budgets, utilization, layers: room)
    cuda = [torch.device("cuda")]
    assert cache_room(None, shape, cuda, EngineConfig(kv_block_size=16), 64, 4, share=0.8) == int(room * 0.8)
    with pytest.raises(KVCacheTooSmall):
        cache_room(None, shape, cuda, EngineConfig(kv_block_size=16), 64, 4, share=0.5)  # 50 tokens < 64 + 16
    small = CacheShape(2, 2, 16, torch.float32)
    whole = cache_room(None, small, [torch.device("cpu")], EngineConfig(), 64, 4)
    half = cache_room(None, small, [torch.device("cpu")], EngineConfig(), 64, 4, share=0.5)
    assert half == pytest.approx(whole / 2, rel=0.05)  # the CPU's rule, then the share (free memory may move)
