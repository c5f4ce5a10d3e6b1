"""HF_MODEL_QUANTIZE (TGI's names) mapped onto the quantizations transformers can load.

- ``bitsandbytes`` (8-bit), ``bitsandbytes-nf4``, ``bitsandbytes-fp4``: quantized at load time with
  ``BitsAndBytesConfig``; CUDA only here, and the ``bitsandbytes`` package must be installed.
- ``eetq``: int8 at load time with ``EetqConfig`` (CUDA, ``eetq`` package).
- ``fp8``: a checkpoint already in fp8 loads as it is; otherwise ``FineGrainedFP8Config`` quantizes at load
  time (CUDA with compute capability 8.9 or newer: L4, L40S, H100).
- ``gptq``, ``awq``, ``compressed-tensors``: pre-quantized checkpoints only; transformers reads the method from
  the checkpoint's ``config.json`` (``quantization_config``), so the variable only has to agree with it.
- ``exl2``, ``marlin``: TGI kernels that transformers does not load; a configuration error says so.

A checkpoint that is already quantized loads with its own method even when HF_MODEL_QUANTIZE is unset.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any, Optional

BITSANDBYTES = {"bitsandbytes": 1.0, "bitsandbytes-nf4": 0.5, "bitsandbytes-fp4": 0.5}
PRE_QUANTIZED = {
    "gptq": ("gptq",),
    "awq": ("awq",),
    "compressed-tensors": ("compressed-tensors",),
    "fp8": ("fp8", "fbgemm_fp8"),
}
UNSUPPORTED = {
    "exl2": "ExLlamaV2 checkpoints are TGI-only; use a GPTQ or AWQ export of the model",
    "marlin": "Marlin is a TGI kernel; use the model's GPTQ checkpoint (transformers picks its kernels itself)",
}


class QuantizationError(ValueError):
    """HF_MODEL_QUANTIZE asks for something this machine or checkpoint cannot do; the message says what."""


@dataclass(frozen=True)
class Quantization:
    """What to add to ``from_pretrained`` and what /info reports (``method`` is None for a plain model)."""

    method: Optional[str] = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    bytes_per_parameter: Optional[float] = None  # for the placement estimate; None: the dtype's size


def checkpoint_method(config: Any) -> tuple[Optional[str], Optional[int]]:
    """The quantization method and bit width a checkpoint's config declares (None when not quantized)."""
    declared = getattr(config, "quantization_config", None)
    if declared is None:
        return None, None
    as_dict = declared if isinstance(declared, dict) else declared.to_dict()
    method = as_dict.get("quant_method")
    return (str(method) if method else None), as_dict.get("bits")


def resolve_quantization(requested: Optional[str], on_cuda: bool, config: Any, compute_dtype: Any) -> Quantization:
    """The quantization to load with, or QuantizationError naming the unsupported combination."""
    method, bits = checkpoint_method(config)
    if method is not None:
        return _pre_quantized(requested, method, bits)
    if requested is None:
        return Quantization()
    if requested in UNSUPPORTED:
        raise QuantizationError(f"HF_MODEL_QUANTIZE={requested} is not supported: {UNSUPPORTED[requested]}")
    if requested in ("gptq", "awq", "compressed-tensors"):
        raise QuantizationError(
            f"HF_MODEL_QUANTIZE={requested} needs a checkpoint already quantized with {requested} (its config.json "
            "has a quantization_config); this model has none. Use such a checkpoint, or bitsandbytes/eetq/fp8 to "
            "quantize at load"
        )
    if not on_cuda:
        raise QuantizationError(
            f"HF_MODEL_QUANTIZE={requested} quantizes at load time with CUDA kernels, and no GPU is in use; "
            "unset it (and pick DTYPE) to serve on the CPU"
        )
    if requested in BITSANDBYTES:
        return _bitsandbytes(requested, compute_dtype)
    if requested == "eetq":
        _require_package("eetq", requested)
        from transformers import EetqConfig

        return Quantization(requested, {"quantization_config": EetqConfig("int8")}, 1.0)
    from transformers import FineGrainedFP8Config

    return Quantization(requested, {"quantization_config": FineGrainedFP8Config()}, 1.0)


def _pre_quantized(requested: Optional[str], method: str, bits: Optional[int]) -> Quantization:
    """A checkpoint quantized with ``method``: transformers reads it from the config; the variable must agree."""
    if requested is not None and method not in PRE_QUANTIZED.get(requested, ()):
        raise QuantizationError(
            f"HF_MODEL_QUANTIZE={requested} but the checkpoint is already quantized with {method}; "
            f"unset HF_MODEL_QUANTIZE or set it to match"
        )
    return Quantization(f"{method} (pre-quantized)", {}, (bits or 8) / 8)


def _bitsandbytes(requested: str, compute_dtype: Any) -> Quantization:
    _require_package("bitsandbytes", requested)
    from transformers import BitsAndBytesConfig

    if requested == "bitsandbytes":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=requested.rsplit("-", 1)[1], bnb_4bit_compute_dtype=compute_dtype
        )
    return Quantization(requested, {"quantization_config": config}, BITSANDBYTES[requested])


def _require_package(package: str, requested: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise QuantizationError(f"HF_MODEL_QUANTIZE={requested} needs the {package} package: pip install {package}")
