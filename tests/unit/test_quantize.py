"""HF_MODEL_QUANTIZE → what transformers loads, and clear errors for what cannot work."""

from types import SimpleNamespace

import pytest
import torch
from transformers import BitsAndBytesConfig, FineGrainedFP8Config

from serve.loading import quantize
from serve.loading.quantize import QuantizationError, resolve_quantization

PLAIN = SimpleNamespace()
GPTQ_4BIT = SimpleNamespace(quantization_config={"quant_method": "gptq", "bits": 4})
FP8 = SimpleNamespace(quantization_config={"quant_method": "fp8"})


def test_plain_model_without_quantization():
    assert resolve_quantization(None, on_cuda=False, config=PLAIN, compute_dtype=torch.float32).method is None


@pytest.mark.parametrize(
    "method, eight_bit, quant_type",
    [("bitsandbytes", True, None), ("bitsandbytes-nf4", False, "nf4"), ("bitsandbytes-fp4", False, "fp4")],
)
def test_bitsandbytes_on_cuda_maps_to_bitsandbytes_config(monkeypatch, method, eight_bit, quant_type):
    monkeypatch.setattr(quantize, "_require_package", lambda package, requested: None)  # the CUDA image ships it
    result = resolve_quantization(method, on_cuda=True, config=PLAIN, compute_dtype=torch.bfloat16)
    config = result.kwargs["quantization_config"]
    assert isinstance(config, BitsAndBytesConfig) and config.load_in_8bit is eight_bit and result.method == method
    if quant_type:
        assert config.bnb_4bit_quant_type == quant_type and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert result.bytes_per_parameter == (1.0 if eight_bit else 0.5)


def test_fp8_quantizes_at_load_on_cuda_and_loads_fp8_checkpoints_as_they_are():
    at_load = resolve_quantization("fp8", on_cuda=True, config=PLAIN, compute_dtype=torch.bfloat16)
    assert isinstance(at_load.kwargs["quantization_config"], FineGrainedFP8Config)
    assert resolve_quantization("fp8", on_cuda=True, config=FP8, compute_dtype=torch.bfloat16).kwargs == {}


def test_pre_quantized_checkpoints_load_through_their_config():
    result = resolve_quantization("gptq", on_cuda=True, config=GPTQ_4BIT, compute_dtype=torch.float16)
    assert (result.method, result.kwargs, result.bytes_per_parameter) == ("gptq (pre-quantized)", {}, 0.5)
    assert (
        resolve_quantization(None, on_cuda=True, config=GPTQ_4BIT, compute_dtype=torch.float16).method
        == "gptq (pre-quantized)"
    )


@pytest.mark.parametrize(
    "method, on_cuda, config, message",
    [
        (
            "bitsandbytes",
            False,
            PLAIN,
            "HF_MODEL_QUANTIZE=bitsandbytes quantizes at load time with CUDA kernels, and no GPU",
        ),
        ("bitsandbytes-nf4", False, PLAIN, "no GPU is in use"),
        ("fp8", False, PLAIN, "no GPU is in use"),
        ("gptq", True, PLAIN, "HF_MODEL_QUANTIZE=gptq needs a checkpoint already quantized with gptq"),
        ("awq", True, GPTQ_4BIT, "HF_MODEL_QUANTIZE=awq but the checkpoint is already quantized with gptq"),
        ("exl2", True, PLAIN, "HF_MODEL_QUANTIZE=exl2 is not supported"),
        ("marlin", True, PLAIN, "HF_MODEL_QUANTIZE=marlin is not supported"),
    ],
)
def test_unsupported_combinations_are_configuration_errors(method, on_cuda, config, message):
    with pytest.raises(QuantizationError, match=message):
        resolve_quantization(method, on_cuda=on_cuda, config=config, compute_dtype=torch.float32)


def test_a_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QuantizationError, match="needs the bitsandbytes package: pip install bitsandbytes"):
        resolve_quantization("bitsandbytes", on_cuda=True, config=PLAIN, compute_dtype=torch.float16)
