"""HF_MODEL_LOAD_FORMAT=dummy: the model of ``config.json`` with seeded random weights, as vLLM's ``--load-format
dummy`` (benchmarks and GPU checks without downloading a checkpoint)."""

from __future__ import annotations

import logging
from typing import Any

from serve.config import Settings
from serve.loading.source import ModelLoadError

log = logging.getLogger(__name__)

DUMMY_SEED = 0


def dummy_model(prepared: Any, settings: Settings, devices: tuple[str, ...]) -> tuple[Any, Any]:
    """HF_MODEL_LOAD_FORMAT=dummy: the model of ``config.json`` with random weights, built on its device and dtype.

    Parameters are allocated directly on the target device (no CPU copy first) and drawn from a small normal
    distribution with a fixed seed, so two engines (and HF reference runs) built from one folder agree.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    if len(devices) != 1 or prepared.quantization.method:
        raise ModelLoadError("HF_MODEL_LOAD_FORMAT=dummy needs one device per engine and no HF_MODEL_QUANTIZE")
    trust = settings.trust_remote_code
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(prepared.folder), trust_remote_code=trust)
        config = AutoConfig.from_pretrained(str(prepared.folder), trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the config or tokenizer in {prepared.folder}: {exc}") from exc
    log.info("HF_MODEL_LOAD_FORMAT=dummy: random %s weights on %s, no checkpoint read", prepared.dtype, devices[0])
    model = build_random(config, prepared.dtype, torch.device(devices[0]), trust)
    if settings.lean_model and not (trust and getattr(config, "auto_map", None)):
        model = _as_lean(model, config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _as_lean(model: Any, config: Any) -> Any:
    """The same random weights in the lean model (serve/modeling/) when it serves ``config``; else ``model``.

    The weights are copied from transformers' model, so a reference run of that model from the same folder and
    seed sees the same weights."""
    from transformers import GenerationConfig

    from serve.modeling import LlamaForServing, unsupported_reason
    from serve.modeling.weights import load_tensors

    reason = unsupported_reason(config)
    if reason is not None:
        log.info("dummy weights: transformers model code serves %s: %s", config.model_type, reason)
        return model
    lean = LlamaForServing(config, model.device, model.dtype)
    load_tensors(lean, model.state_dict().items())
    lean.generation_config = GenerationConfig.from_model_config(config)
    return lean


def build_random(config: Any, dtype: Any, device: Any, trust_remote_code: bool = False, seed: int = DUMMY_SEED) -> Any:
    """A transformers causal LM of ``config`` with seeded random weights, built on ``device`` in ``dtype``, in
    eval mode (``dummy_model`` moves the weights into the lean model where it serves the architecture)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # parameters allocated on the device; from_config sets the default dtype
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    _randomize(model, float(getattr(config, "initializer_range", 0.02) or 0.02), seed)
    return model.eval()


def _randomize(model: Any, std: float, seed: int) -> None:
    """Matrices (projections, embeddings) ~ N(0, std); vectors (norm scales, biases) keep their built values."""
    import torch

    generator = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, std, generator=generator)
