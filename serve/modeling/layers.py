"""Building blocks of the lean models: fused linear layers that know their parts, RMSNorm and rotary embeddings."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

# rope types whose frequencies are fixed at start-up (dynamic and longrope change them with the sequence length)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class OneDNN:
    """oneDNN's blocked layout for a float32 weight, tuned for steps of about PACK_ROWS_HINT rows."""

    label = "oneDNN-packed"
    labels = {torch.float32: label}  # the weight dtypes it packs

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)

    def linear(
        self, x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], out_features: int
    ) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


class Linear(nn.Linear):
    """``nn.Linear`` whose weight can be handed once to a CPU kernel in the kernel's own layout (``pack``): the
    panel kernel (serve/modeling/cpu_kernel.c) or oneDNN.

    A packed layer multiplies through its kernel without reordering the weight on every call; its ``weight`` then
    keeps only its shape, dtype and device (what LoRA checks), unless another module shares it.
    """

    packed: Optional[torch.Tensor] = None
    kernel: Any = None

    def pack(self, kernel: Any) -> None:
        """Reorder the weight for ``kernel`` (OneDNN or a PanelKernel); the dense copy stays until drop_dense."""
        self.packed, self.kernel = kernel.pack(self.weight), kernel

    def unpack(self) -> None:
        """Back to the dense weight (while it is still held)."""
        self.packed = self.kernel = None

    def drop_dense(self) -> None:
        """Free the dense weight of a packed layer, keeping a storage-less tensor of its shape, dtype and device."""
        shape_only = torch.empty((), dtype=self.weight.dtype, device=self.weight.device).expand(self.weight.shape)
        self.weight = nn.Parameter(shape_only, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return self.kernel.linear(x, self.packed, self.bias, self.out_features)


def linear_plus(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + layer(x)`` for 2-D ``x``: one GEMM that adds the residual in its epilogue when ``layer`` is a
    dense bias-free ``Linear`` (a GPU's case: one kernel instead of two) or packed for the panel kernel (float32);
    otherwise the layer, then the sum (oneDNN, biases on dense layers, LoRA wrappers)."""
    if isinstance(layer, Linear) and layer.packed is None and layer.bias is None:
        return torch.addmm(residual, x, layer.weight.t())
    if isinstance(layer, Linear) and hasattr(layer.kernel, "linear_plus"):  # the panel kernel adds it as it stores
        return layer.kernel.linear_plus(x, layer.packed, layer.bias, layer.out_features, residual)
    return residual + layer(x)


class FusedLinear(Linear):
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

    layer_ops: Any = None  # cpu_kernel.LayerOps on a float32 CPU model (use_layer_ops): one pass instead of torch's ops

    def __init__(self, size: int, eps: float, device: Any = None, dtype: Any = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = self.layer_ops
        if ops is not None and ops.takes(x, self.weight):
            return ops.rms_norm(x, self.weight, self.eps)
        # torch's fused op: one kernel on a GPU (the statistics in float32) where the spelled-out formula is eight
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def use_layer_ops(model: nn.Module, ops: Any) -> int:
    """Hand ``ops`` (serve.modeling.cpu_kernel.LayerOps) to every module of ``model`` that can run its elementwise
    work on them (those with a ``layer_ops`` attribute: RMSNorm, the lean model's attention, MLP and decoder layer,
    which runs each half of itself in one call where it can). Each module still checks every call's tensors
    (float32, contiguous, on the CPU) and falls back to torch's ops otherwise. Returns how many modules took them;
    ``ops`` None takes them back."""
    takers = [module for module in model.modules() if hasattr(type(module), "layer_ops")]
    for module in takers:
        module.layer_ops = ops
    return len(takers)


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
    """cos/sin tables for the step's positions, computed once per forward and shared by every layer. The sin
    table's first half is negated (``rotate_`` then needs no negation kernel per layer)."""

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
        sin = angles.sin() * self.scale
        sin[:, : freqs.shape[1]].neg_()
        return (angles.cos() * self.scale).to(dtype), sin.to(dtype)


def rotate_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [tokens, heads, dim] in place by the positions' angles, half-split layout: cos/signed_sin
    [tokens, dim] as ``Rotary`` makes them (sin with its first half negated, so x * cos + swap(x) * signed_sin).

    In place, so that one call rotates the queries and keys of a fused q/k/v output together (three kernels)."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x.mul_(cos[:, None, :]).addcmul_(swapped, signed_sin[:, None, :])


PACK_ROWS_HINT = 32  # oneDNN's blocking for ~32-row steps: best here over batch 1-32 decode (docs/benchmarks.md)
PACK_TOLERANCE = 1e-4  # relative error of a packed layer against the dense matmul (fp32 reorderings: ~1e-7)
# (plus the dtype's epsilon: a bf16 layer rounds its float32 sums once, ~2e-3 of the float32 result's norm)


def pack_for_cpu(model: nn.Module, kernel: Any = None) -> str:
    """Pack every ``Linear`` of a CPU model for ``kernel`` (default: oneDNN) when it takes the model's dtype (its
    ``labels``), each checked against its dense matmul in float32 on a probe before its dense weight goes. Returns
    what was done; a layer that fails its check stops the packing, leaving it and the rest dense (correct either
    way) and saying why."""
    kernel = kernel or OneDNN()
    layers = [module for module in model.modules() if isinstance(module, Linear)]
    if not layers:
        return "dense: no packable linear layers"
    weight = layers[0].weight
    if weight.device.type != "cpu" or weight.dtype not in kernel.labels:
        takes = " or ".join(str(dtype).removeprefix("torch.") for dtype in kernel.labels)
        return f"dense: CPU kernels take {takes} on the CPU (the model is {weight.dtype} on {weight.device})"
    if isinstance(kernel, OneDNN) and not torch.backends.mkldnn.is_available():
        return "dense: this torch build has no oneDNN"
    shared = {id(p) for m in model.modules() if not isinstance(m, Linear) for p in m.parameters(recurse=False)}
    generator = torch.Generator().manual_seed(0)
    for index, layer in enumerate(layers):
        probe = torch.randn(3, layer.in_features, generator=generator).to(weight.dtype)
        bias = None if layer.bias is None else layer.bias.float()
        expected = F.linear(probe.float(), layer.weight.float(), bias)
        layer.pack(kernel)
        error = float((layer(probe).float() - expected).norm() / expected.norm().clamp(min=1e-30))
        if not error <= PACK_TOLERANCE + torch.finfo(weight.dtype).eps:
            layer.unpack()
            return f"{index} of {len(layers)} layers packed: a packed layer was off by {error:.1e} (dense from there)"
        if id(layer.weight) not in shared:
            layer.drop_dense()
    return f"{kernel.labels[weight.dtype]}: {len(layers)} linear layers"
