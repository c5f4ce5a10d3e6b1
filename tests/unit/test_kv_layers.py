"""Each layer's KV cache lives on that layer's device (a model split over GPUs); checked on the CPU here."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from serve.engine.attention import PrefillChunk, StepLayout
from serve.engine.kv_cache import CacheShape, PagedKVCache, layer_devices


def tiny_llama(layers: int = 3) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    return LlamaForCausalLM(config)


def test_layer_devices_follow_the_attention_modules():
    model = tiny_llama(3)
    assert layer_devices(model, 3) == [torch.device("cpu")] * 3
    model.model.layers[1].self_attn.to("meta")  # as if accelerate had put layer 1 elsewhere
    assert layer_devices(model, 3) == [torch.device("cpu"), torch.device("meta"), torch.device("cpu")]
    assert layer_devices(model, 5) == [model.device] * 5  # modules that do not match the config: one device


def test_cache_tensors_are_allocated_per_layer_device():
    shape = CacheShape.of(tiny_llama(2).config, torch.float32)
    cache = PagedKVCache(shape, num_blocks=3, block_size=4, devices=[torch.device("cpu"), torch.device("meta")])
    assert [k.device.type for k in cache.keys] == ["cpu", "meta"] and [v.device.type for v in cache.values] == [
        "cpu",
        "meta",
    ]


def test_a_layout_moves_to_another_device_once_per_step():
    layout = StepLayout(
        rows=torch.tensor([3, 9]),
        decode_count=1,
        decode_blocks=torch.tensor([[1]]),
        decode_mask=torch.ones(1, 1, 1, 4, dtype=torch.bool),
        prefills=[PrefillChunk(1, 2, 0, torch.tensor([2]), None)],
    )
    assert layout.on(torch.device("cpu")) is layout
    moved = layout.on(torch.device("meta"))
    assert moved.rows.device.type == "meta" and moved.decode_mask.device.type == "meta"
    assert moved.decode_blocks.device.type == "meta" and moved.prefills[0].blocks.device.type == "meta"
    assert layout.on(torch.device("meta")) is moved
