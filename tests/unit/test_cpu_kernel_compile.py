"""COMPILE over the panel kernel: under torch.compile a packed layer is one opaque operator
(``torch.ops.serve.panel_linear``), so dynamo traces each layer half whole around it (no graph break at every linear)
and the compiled logits equal eager ones; bf16 models pass the self-check at their own dtype's rounding."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LlamaConfig

from serve.engine.compile import EPSILONS_OF_LOW_PRECISION, PROBE_TOLERANCE, probe_tolerance
from serve.engine.kv_cache import CacheShape, PagedKVCache
from serve.engine.runner import ModelRunner
from serve.modeling import LlamaForServing
from serve.modeling.cpu_kernel import cpu_flags, load_panel_kernel
from serve.modeling.layers import pack_for_cpu

CONFIG = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    built, why_not = load_panel_kernel(str(tmp_path_factory.mktemp("kernel-cache")))
    assert built is not None, why_not
    return built


def packed_runner(kernel, dtype: torch.dtype) -> ModelRunner:
    config = LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    model = LlamaForServing.from_config(config, "cpu", dtype)
    assert pack_for_cpu(model, kernel).endswith(": 9 linear layers")
    return ModelRunner(model, PagedKVCache(CacheShape.of(config, dtype), 8, 16, torch.device("cpu")), None, 4, 4)


def test_the_operator_is_the_kernel_with_a_consistent_shape_function(kernel):
    generator = torch.Generator().manual_seed(0)
    weight, x, bias = (torch.randn(*shape, generator=generator) for shape in ((40, 24), (3, 5, 24), (40,)))
    panels = kernel.pack(weight)
    got = torch.ops.serve.panel_linear(x, panels, bias, 40, kernel.key)
    assert torch.equal(got, kernel.linear(x, panels, bias, 40))
    torch.testing.assert_close(got, torch.nn.functional.linear(x, weight, bias))
    torch.library.opcheck(torch.ops.serve.panel_linear.default, (x, panels, bias, 40, kernel.key))


def test_compile_traces_packed_layers_whole_and_matches_eager(kernel, tmp_path):
    runner = packed_runner(kernel, torch.float32)
    torch._dynamo.reset()
    counters.clear()
    report = runner.compile_layers(str(tmp_path))
    assert report.enabled, report.reason
    assert report.probe_error < 1e-5  # the same kernel on the same inputs; inductor only fuses the ops around it
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.skipif(not {"avx512f", "avx512_bf16"} <= cpu_flags(), reason="the CPU has no AVX-512 BF16")
def test_a_bf16_model_on_the_kernel_passes_the_self_check_at_bf16_rounding(kernel, tmp_path):
    runner = packed_runner(kernel, torch.bfloat16)
    torch._dynamo.reset()
    report = runner.compile_layers(str(tmp_path))
    assert report.enabled, report.reason
    assert report.probe_error <= probe_tolerance(torch.bfloat16)  # bf16 rounding, not a wrong kernel (order 1)


def test_the_probe_tolerance_follows_the_dtype():
    assert probe_tolerance(torch.float32) == PROBE_TOLERANCE
    assert probe_tolerance(torch.bfloat16) == EPSILONS_OF_LOW_PRECISION * torch.finfo(torch.bfloat16).eps < 0.1
    assert probe_tolerance(torch.float16) == EPSILONS_OF_LOW_PRECISION * torch.finfo(torch.float16).eps < 0.01
