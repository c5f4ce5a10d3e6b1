"""The float32 layer ops of the CPU panel kernel library (serve/modeling/cpu_kernel.c): RMSNorm, the SiLU-gated
product and the rotary embedding in one pass each, and the residual added as the panel kernel stores its outputs,
each against torch's own ops; the lean model with them against itself without.

(Greedy tokens of a model loaded with them equal transformers' generate: tests/unit/test_lean_model.py, whose loader
hands them to the model.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from serve.engine.attention import PrefillChunk, StepLayout, active_step
from serve.engine.kv_cache import CacheShape, PagedKVCache
from serve.modeling import LlamaForServing
from serve.modeling.cpu_kernel import load_panel_kernel
from serve.modeling.layers import pack_for_cpu, rotate_, use_layer_ops


def prompt_logits(model: LlamaForServing, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position of one prompt, its keys and values written to a fresh paged cache."""
    cache = PagedKVCache(CacheShape.of(model.config, torch.float32), 2, 16, torch.device("cpu"))
    chunk = PrefillChunk(0, len(ids), 0, blocks=torch.tensor([1]))
    layout = StepLayout(16 + torch.arange(len(ids)), 0, None, None, [chunk])
    with torch.inference_mode(), active_step(cache, layout):
        return model(ids[None], torch.arange(len(ids))[None]).logits[0]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    found, why_not = load_panel_kernel(str(tmp_path_factory.mktemp("kernels")))
    assert found is not None, why_not  # every machine the suite runs on has AVX2 and a C compiler
    return found


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((got - expected).abs() / expected.abs().clamp(min=1e-6)).max())


@pytest.mark.parametrize("rows, size", [(1, 576), (7, 100), (300, 576)], ids=str)  # a tail; the threaded pass
def test_rms_norm_equals_torch(kernel, rows, size):
    generator = torch.Generator().manual_seed(rows)
    x, weight = torch.randn(rows, size, generator=generator) * 3, torch.randn(size, generator=generator)
    expected = F.rms_norm(x, (size,), weight, 1e-5)
    assert relative_error(kernel.layer_ops.rms_norm(x, weight, 1e-5), expected) < 1e-5


@pytest.mark.parametrize("rows, size", [(1, 1536), (5, 20), (64, 1536)], ids=str)
def test_silu_gate_equals_torch_across_the_exponential_range(kernel, rows, size):
    gate_up = torch.randn(rows, 2 * size, generator=torch.Generator().manual_seed(size)) * 4
    gate_up[0, :6] = torch.tensor([-100.0, 100.0, 0.0, -88.0, 89.0, -1e-8])
    gate, up = gate_up.chunk(2, dim=-1)
    got = kernel.layer_ops.silu_mul(gate_up)
    assert got.shape == (rows, size)
    assert relative_error(got, F.silu(gate) * up) < 1e-5


@pytest.mark.parametrize("dim", [64, 20], ids=str)  # 20: halves of 10, a vector and a tail
def test_rotary_rotates_the_first_heads_in_place_as_torch_does(kernel, dim):
    generator = torch.Generator().manual_seed(dim)
    heads = torch.randn(9, 5, dim, generator=generator)  # 3 query, 1 key and 1 value head per token
    cos, sin = torch.randn(9, dim, generator=generator), torch.randn(9, dim, generator=generator)
    expected = heads.clone()
    rotate_(expected[:, :4], cos, sin)
    kernel.layer_ops.rope_(heads, 4, cos, sin)
    assert torch.allclose(heads, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(heads[:, 4], expected[:, 4])  # the value head is left alone


def test_the_ops_take_only_contiguous_float32_cpu_tensors(kernel):
    ops = kernel.layer_ops
    x = torch.randn(4, 16)
    assert ops.takes(x, torch.randn(16))
    assert not ops.takes(x.bfloat16())
    assert not ops.takes(x[:, :8])
    assert not ops.takes(x.t())


@pytest.mark.parametrize("rows", [1, 5, 32], ids=str)  # the AVX2 tile (one row) and the AVX-512 one
@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "bias"])
def test_the_residual_added_as_outputs_are_stored_is_the_same_sum(kernel, rows, bias):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(100, 64, generator=generator)
    b = torch.randn(100, generator=generator) if bias else None
    x, residual = torch.randn(rows, 64, generator=generator), torch.randn(rows, 100, generator=generator)
    panels = kernel.pack(weight)
    fused = kernel.linear_plus(x, panels, b, 100, residual)
    assert torch.equal(fused, residual + kernel.linear(x, panels, b, 100))  # bit for bit
    strided = torch.randn(rows, 200, generator=generator)[:, ::2]  # not contiguous: the sum after, same value
    assert torch.equal(kernel.linear_plus(x, panels, b, 100, strided), strided + kernel.linear(x, panels, b, 100))


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])  # qwen3: q/k norms, so the rotation stays torch's
def test_the_lean_model_with_layer_ops_equals_itself_without(kernel, model_type):
    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    config = LlamaConfig(**shape)
    config.model_type = model_type
    torch.manual_seed(0)
    model = LlamaForServing.from_config(config)
    pack_for_cpu(model, kernel)
    ids = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(1))
    plain = prompt_logits(model, ids)
    taken = use_layer_ops(model, kernel.layer_ops)
    per_layer = 5 + (2 if model_type == "qwen3" else 0)  # the layer, its two norms, attention, the MLP; Qwen3's
    assert taken == 2 * per_layer + 1  # q and k norms; and the final norm
    assert all((layer.fused() is None) == (model_type == "qwen3") for layer in model.model.layers)
    fused = prompt_logits(model, ids)
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused.argmax(-1), plain.argmax(-1))


@pytest.mark.parametrize("rows", [1, 12], ids=str)
def test_a_layer_in_two_calls_gives_the_same_bits_as_its_ops_one_by_one(kernel, rows):
    """The fused halves (cpu_kernel.FusedHalves) against the same layer op by op, biases included (Qwen2)."""
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    config.model_type = "qwen2"  # q/k/v biases
    torch.manual_seed(rows)
    model = LlamaForServing.from_config(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.normal_(1.0 if "norm" in name else 0.0, 0.2)
    pack_for_cpu(model, kernel)
    use_layer_ops(model, kernel.layer_ops)
    ids = torch.randint(0, 300, (rows,), generator=torch.Generator().manual_seed(2))
    fused = prompt_logits(model, ids)
    assert all(layer.fused() is not None for layer in model.model.layers)
    for layer in model.model.layers:
        layer.layer_ops = None  # the layer's modules keep theirs: op by op
        assert layer.fused() is None
    assert torch.equal(prompt_logits(model, ids), fused)


def test_a_layer_runs_op_by_op_while_an_adapter_wraps_one_of_its_projections(kernel):
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    model = LlamaForServing.from_config(config)
    pack_for_cpu(model, kernel)
    use_layer_ops(model, kernel.layer_ops)
    layer = model.model.layers[0]
    built = layer.fused()
    assert built is not None and layer.fused() is built  # built once
    base = layer.mlp.down_proj
    layer.mlp.down_proj = torch.nn.Sequential(base)  # what an adapter's wrapper does: another module in its place
    assert layer.fused() is None
    layer.mlp.down_proj = base
    assert layer.fused() is not None
    base.pack(kernel)  # new panels (the same values): built again over them
    rebuilt = layer.fused()
    assert rebuilt is not built and rebuilt.weights["down"] is base.packed
