"""Building blocks of the lean models: fused linear layers that know their parts, RMSNorm and rotary embeddings."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# rope types whose frequencies are fixed at start-up (dynamic and longrope change them with the sequence length)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class FusedLinear(nn.Linear):
    """One linear layer computing several of the checkpoint's projections at once (q/k/v, or gate/up).

    ``parts`` maps each checkpoint projection's name (``q_proj``...) to its slice of the output features, so weight
    loading and LoRA adapters address the parts by the names the checkpoint and peft use.
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool, device: Any = None, dtype: Any = None):
        super().__init__(in_features, sum(parts.values()), bias=bias, device=device, dtype=dtype)
        self.parts: dict[str, slice] = {}
        start = 0
        for name, size in parts.items():
            self.parts[name] = slice(start, start + size)
            start += size


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, computed in float32 as transformers does."""

    def __init__(self, size: int, eps: float, device: Any = None, dtype: Any = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_type(config: Any) -> str:
    """The config's rope type ("default" when it names none)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    return parameters.get("rope_type", parameters.get("type", "default"))


def rope_frequencies(config: Any) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and cos/sin scale, from transformers' own rope-init functions, so scaled variants
    (linear, llama3, yarn) match the reference implementation exactly."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = rope_type(config)
    if kind == "default":  # transformers computes it in each model class, with this formula
        base = config.rope_parameters["rope_theta"]
        dim = head_dim_of(config)
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
    inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](config)  # (config, device=None, ...) in 5.17 and later
    return inv_freq.float().cpu(), float(scale)


def head_dim_of(config: Any) -> int:
    """Per-head size: ``head_dim`` when the config sets it, else hidden_size / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Rotary(nn.Module):
    """cos/sin tables for the step's positions, computed once per forward and shared by every layer."""

    def __init__(self, config: Any):
        super().__init__()
        self.config = config
        self.scale = 1.0
        self.register_buffer("inv_freq", torch.empty(head_dim_of(config) // 2), persistent=False)

    def reset(self) -> None:
        """(Re)compute the frequencies (after the module was materialised on its device)."""
        inv_freq, self.scale = rope_frequencies(self.config)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        return (angles.cos() * self.scale).to(dtype), (angles.sin() * self.scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [tokens, heads, dim] by the positions' angles (cos/sin [tokens, dim]), half-split layout."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
