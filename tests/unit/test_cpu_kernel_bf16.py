"""The panel kernel's bfloat16 weights (serve/modeling/cpu_kernel.c, AVX-512 BF16): float32 sums of exact products
rounded once, so within one bf16 rounding of the float32 matmul and as close as torch's own bf16 matmul; the same
bits for a row alone or batched; bf16 models packed for it; CPUs without avx512_bf16 keep it for float32 only."""

import copy

import pytest
import torch
import torch.nn.functional as F

from transformers import AutoModelForCausalLM, AutoTokenizer

from serve.engine import Request, SamplingParams
from serve.modeling.cpu_kernel import PanelKernel, cpu_flags, load_panel_kernel
from serve.modeling.layers import Linear, pack_for_cpu
from serve.wiring import single_engine
from tests.unit.test_cpu_packing import LINEARS, linears, tiny_model
from tests.unit.test_lean_model import FAMILIES, NEW_TOKENS, TEXTS, generate, save_random_model, settings_for


needs_bf16 = pytest.mark.skipif(
    not {"avx512f", "avx512_bf16"} <= cpu_flags(), reason="the CPU has no AVX-512 BF16 (covered where it has)"
)
BF16_EPS = torch.finfo(torch.bfloat16).eps


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    built, why_not = load_panel_kernel(str(tmp_path_factory.mktemp("kernel-cache")))
    assert built is not None, why_not
    return built


def operands(out_features: int, in_features: int, rows: int, bias: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    return weight, x, torch.randn(out_features, generator=generator).bfloat16() if bias else None


def float32_reference(x, weight, bias):
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


@needs_bf16
@pytest.mark.parametrize("out_features,in_features", [(64, 32), (50, 37), (300, 64), (7, 5), (17, 1), (40, 576)])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 13, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_it_is_the_float32_matmul_rounded_once_to_bf16(kernel, out_features, in_features, rows, bias):
    weight, x, b = operands(out_features, in_features, rows, bias)
    got = kernel.linear(x, kernel.pack(weight), b, out_features)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    exact = float32_reference(x, weight, b)
    # each output within half a bf16 step of the float32 result (plus float32 reordering), like torch's bf16 matmul
    bound = exact.abs() * BF16_EPS / 2 * 1.01 + 1e-5
    assert ((got.float() - exact).abs() <= bound).all()
    torch.testing.assert_close(got, F.linear(x, weight, b))  # bf16's default tolerance


@needs_bf16
def test_a_row_gets_the_same_bits_alone_and_in_any_batch(kernel):
    weight, x, _ = operands(100, 72, 20, bias=False)
    panels = kernel.pack(weight)
    alone = kernel.linear(x[7:8], panels, None, 100)
    for rows in (range(6, 9), range(0, 8), range(0, 20), range(7, 16)):
        batch = kernel.linear(x[list(rows)], panels, None, 100)
        assert torch.equal(batch[list(rows).index(7)], alone[0])


@needs_bf16
def test_leading_dimensions_strided_inputs_and_no_rows(kernel):
    weight, x, b = operands(48, 24, 12, bias=True)
    panels = kernel.pack(weight)
    assert panels.dtype == torch.bfloat16 and panels.numel() == 48 * 24  # half the bytes of the float32 panels
    batched = x.view(3, 4, 24)
    torch.testing.assert_close(kernel.linear(batched, panels, b, 48), F.linear(batched, weight, b))
    strided = torch.randn(24, 12).bfloat16().t()  # [12, 24], not contiguous
    torch.testing.assert_close(kernel.linear(strided, panels, b, 48), F.linear(strided, weight, b))
    assert kernel.linear(x[:0], panels, b, 48).shape == (0, 48)


@needs_bf16
@pytest.mark.parametrize("tied", [True, False])
def test_bf16_models_are_packed_for_it_and_free_their_dense_weights(kernel, tied):
    model = tiny_model(tied, dtype=torch.bfloat16)
    dense = copy.deepcopy(model)
    assert pack_for_cpu(model, kernel) == f"panel kernel (AVX-512 BF16): {LINEARS} linear layers"
    for packed, reference in zip(linears(model), linears(dense)):
        assert packed.kernel is kernel and packed.packed.dtype == torch.bfloat16
        x = torch.randn(5, packed.in_features).bfloat16()
        torch.testing.assert_close(packed(x), reference(x))
    freed = [layer for layer in linears(model) if layer is not model.lm_head or not tied]
    assert all(layer.weight.untyped_storage().nbytes() <= 2 for layer in freed)


def test_a_cpu_without_avx512_bf16_keeps_the_kernel_for_float32_only(kernel):
    plain = PanelKernel(kernel.path, flags={"avx2", "fma", "avx512f"})
    assert plain.bf16_missing == "the CPU lacks avx512_bf16"
    assert list(plain.labels) == [torch.float32]
    with pytest.raises(ValueError, match="takes torch.float32, not torch.bfloat16"):
        plain.pack(torch.zeros(16, 8, dtype=torch.bfloat16))
    model = tiny_model(tied=False, dtype=torch.bfloat16)
    assert pack_for_cpu(model, plain).startswith("dense: CPU kernels take float32 on the CPU (the model is ")
    assert all(layer.packed is None for layer in linears(model) if isinstance(layer, Linear))


@pytest.fixture(scope="module")
def tokenizer(embedded_folder):
    return AutoTokenizer.from_pretrained(str(embedded_folder))


def engine_run(settings, prompts: list[list[int]]) -> tuple[str, list[list[int]]]:
    """(the loader's CPU weight report, greedy tokens of ``prompts`` served together)."""
    engine = single_engine(settings).start()
    try:
        assert engine.wait_ready(120), engine.load_error
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        streams = [engine.submit(Request(prompt, params)) for prompt in prompts]
        return engine.loaded.cpu_weights, [[e.token_id for e in stream if e.token_id is not None] for stream in streams]
    finally:
        engine.stop()


def hf_rank(model, prompt: list[int], tokens: list[int], at: int) -> int:
    """The rank of ``tokens[at]`` in the reference's logits after ``prompt + tokens[:at]`` (0: its greedy pick)."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + tokens[:at]])).logits[0, -1].float()
    return int((logits > logits[tokens[at]]).sum())


@needs_bf16
def test_a_bf16_model_on_the_kernel_tracks_transformers_bf16_generate(tokenizer, tmp_path):
    """The engine with bf16 panels against transformers' bf16 generate: where greedy paths part, the engine's token
    is a near-tie in the reference's own logits (the bf16 tolerance the GPU suite applies)."""
    folder = save_random_model(FAMILIES["llama-tied"](len(tokenizer)), tmp_path / "llama", tokenizer)
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    report, ours = engine_run(settings_for(folder, dtype="bfloat16"), prompts)
    assert report == "panel kernel (AVX-512 BF16): 9 linear layers"
    reference = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    for prompt, tokens in zip(prompts, ours):
        expected = generate(reference, prompt)
        parted = next((i for i, (a, b) in enumerate(zip(expected, tokens)) if a != b), None)
        assert parted is None or hf_rank(reference, prompt, tokens, parted) < 5, (expected, tokens)
