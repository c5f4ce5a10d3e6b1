"""PACK_CPU_WEIGHTS: the lean model's float32 linear layers handed to a CPU kernel in its own layout (the panel
kernel of serve/modeling/cpu_kernel.c, or oneDNN), each checked against the dense matmul before its dense weight is
freed; anything else stays dense and says why. The panel kernel itself: tests/unit/test_cpu_kernel.py.

(Greedy tokens of packed models equal transformers' generate: tests/unit/test_lean_model.py loads through the
loader, which packs by default.)"""

import copy

import pytest
import torch
from transformers import LlamaConfig

from serve.config import SettingsError, load_settings
from serve.modeling import LlamaForServing
from serve.modeling import layers as layers_module
from serve.modeling.cpu_kernel import load_panel_kernel
from serve.modeling.layers import Linear, OneDNN, pack_for_cpu

SHAPE = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
LINEARS = 2 * 4 + 1  # per layer q/k/v, o, gate/up and down; then the head


def tiny_model(tied: bool, dtype=torch.float32) -> LlamaForServing:
    torch.manual_seed(0)
    return LlamaForServing.from_config(LlamaConfig(tie_word_embeddings=tied, **SHAPE), "cpu", dtype)


def linears(model) -> list[Linear]:
    return [module for module in model.modules() if isinstance(module, Linear)]


def probe(layer: Linear, rows: int = 5) -> torch.Tensor:
    return torch.randn(rows, layer.in_features, generator=torch.Generator().manual_seed(rows))


def kernel_named(name: str, cache_dir: str):
    if name == "onednn":
        return OneDNN()
    kernel, why_not = load_panel_kernel(cache_dir)
    assert kernel is not None, why_not  # every machine the suite runs on has AVX2 and a C compiler
    return kernel


@pytest.mark.parametrize("kernel_name", ["panels", "onednn"])
@pytest.mark.parametrize("tied", [True, False])
def test_packed_layers_equal_dense_and_free_their_dense_weights(tied, kernel_name, tmp_path):
    model = tiny_model(tied)
    dense = copy.deepcopy(model)
    kernel = kernel_named(kernel_name, str(tmp_path))
    assert pack_for_cpu(model, kernel) == f"{kernel.label}: {LINEARS} linear layers"
    for packed, reference in zip(linears(model), linears(dense)):
        assert packed.kernel is kernel and packed.weight.shape == reference.weight.shape
        for rows in (1, 7, 40):  # one packing serves every step size
            torch.testing.assert_close(packed(probe(packed, rows)), reference(probe(reference, rows)))
    freed = [layer for layer in linears(model) if layer is not model.lm_head or not tied]
    assert all(layer.weight.untyped_storage().nbytes() <= 4 for layer in freed)
    if tied:  # the head's weight is the embedding matrix: it stays whole for the embedding lookup
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.lm_head.weight.untyped_storage().nbytes() == 300 * 64 * 4


def test_a_layer_failing_its_check_stops_the_packing_and_stays_dense(monkeypatch):
    model = tiny_model(tied=False)
    dense = copy.deepcopy(model)
    monkeypatch.setattr(layers_module, "PACK_TOLERANCE", -1.0)  # no error is small enough
    report = pack_for_cpu(model)
    assert report.startswith(f"0 of {LINEARS} layers packed: a packed layer was off by ")
    for layer, reference in zip(linears(model), linears(dense)):
        assert layer.packed is None and torch.equal(layer.weight, reference.weight)
        assert torch.equal(layer(probe(layer)), reference(probe(reference)))


def test_other_dtypes_and_the_setting_keep_dense_weights():
    model = tiny_model(tied=False, dtype=torch.bfloat16)
    assert pack_for_cpu(model).startswith("dense: CPU kernels take float32 on the CPU (the model is torch.bfloat16")
    assert all(layer.packed is None for layer in linears(model))
    assert load_settings({"PACK_CPU_WEIGHTS": "false"}).pack_cpu_weights is False
    assert load_settings({}).pack_cpu_weights is True
    assert load_settings({}).cpu_kernel == "panels"
    assert load_settings({"CPU_KERNEL": "oneDNN"}).cpu_kernel == "onednn"
    with pytest.raises(SettingsError, match="CPU_KERNEL='mkl' is not one of panels, onednn"):
        load_settings({"CPU_KERNEL": "mkl"})


def test_the_loader_reports_the_layout(tiny_settings):
    from dataclasses import replace

    from serve.loading.loader import load_model

    loaded = load_model(tiny_settings)
    weights = loaded.cpu_weights
    assert weights.startswith("panel kernel (AVX")
    assert weights.endswith(f": {LINEARS} linear layers; RMSNorm, SiLU gate and rotary in one pass each")
    onednn = load_model(replace(tiny_settings, cpu_kernel="onednn")).cpu_weights
    assert onednn == f"oneDNN-packed: {LINEARS} linear layers (CPU_KERNEL=onednn)"
    assert load_model(replace(tiny_settings, pack_cpu_weights=False)).cpu_weights == "dense: PACK_CPU_WEIGHTS=false"
    assert load_model(replace(tiny_settings, compile=True)).cpu_weights == loaded.cpu_weights  # compiled, packed


def test_without_a_compiler_the_loader_packs_for_onednn_and_says_why(tiny_settings, tmp_path):
    from dataclasses import replace

    from serve.loading.loader import load_model

    settings = replace(tiny_settings, cache_dir=str(tmp_path / "fresh"), c_compiler="no-such-cc")  # nothing built yet
    assert load_model(settings).cpu_weights == (
        f"oneDNN-packed: {LINEARS} linear layers (no panel kernel: no C compiler (no-such-cc) on PATH to build it)"
    )
