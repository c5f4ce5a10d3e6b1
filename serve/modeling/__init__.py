"""Lean model implementations that call the engine's ``attend`` themselves (the Llama family for now)."""

from serve.modeling.llama import LEAN_MODEL_TYPES, LlamaForServing, unsupported_reason
from serve.modeling.weights import CheckpointMismatch, load_pretrained, safetensors_files

__all__ = [
    "LEAN_MODEL_TYPES",
    "CheckpointMismatch",
    "LlamaForServing",
    "load_pretrained",
    "safetensors_files",
    "unsupported_reason",
]
