"""A lean forward for the Llama family (Llama 2/3/3.1, Mistral, Qwen2, Qwen3, SmolLM2) over the engine's KV cache.

The step is one flat row of tokens (decode tokens and prompt chunks of all running sequences): every linear layer
runs once over all of them, q/k/v and gate/up each as one fused matmul, and attention goes through the engine's
single seam, ``serve.engine.attention.attend``. The module tree mirrors transformers' (``model.layers.N.self_attn``,
``model.layers.N.mlp``...), so checkpoint and peft names map onto it; fused layers name their parts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from serve.engine.attention import attend
from serve.modeling.layers import (
    STATIC_ROPE_TYPES,
    FusedLinear,
    Linear,
    RMSNorm,
    Rotary,
    head_dim_of,
    linear_plus,
    rope_type,
    rotate_,
)
from serve.modeling.parallel import ShardLayout, TensorParallel

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def unsupported_reason(config: Any) -> Optional[str]:
    """Why the lean model cannot serve ``config`` exactly as transformers would (None when it can)."""
    if config.model_type not in LEAN_MODEL_TYPES:
        return f"model type {config.model_type!r} has no lean model (lean: {', '.join(LEAN_MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (the lean model implements silu)"
    kind = rope_type(config)
    if kind not in STATIC_ROPE_TYPES:
        return f"rope type {kind!r} (the lean model implements {', '.join(STATIC_ROPE_TYPES)})"
    if (config.rope_parameters or {}).get("partial_rotary_factor", 1.0) != 1.0:
        return "partial rotary embeddings"
    if getattr(config, "quantization_config", None) is not None:
        return "a quantized checkpoint"
    return None


def _biases(config: Any) -> tuple[bool, bool]:
    """(q/k/v bias, o bias) as each family's transformers code builds them."""
    if config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


@dataclass
class CausalOutput:
    """What the runner reads: ``logits`` [1, rows kept, vocab]."""

    logits: torch.Tensor


class Attention(nn.Module):
    """Fused q/k/v projection, optional per-head q/k norms (Qwen3) and RoPE (``run_layer`` then calls the engine's
    attention with them); the o projection."""

    layer_ops: Any = None  # cpu_kernel.LayerOps on a float32 CPU model: the rotation in one pass (layers.use_layer_ops)

    def __init__(self, config: Any, layer_idx: int, dtype: torch.dtype, shard: Optional[ShardLayout] = None):
        super().__init__()
        self.layer_idx = layer_idx  # the engine places each layer's cache by this (kv_cache.layer_devices)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
        if shard is not None:  # tensor parallel: this rank's heads
            self.heads, self.kv_heads = shard.heads, shard.kv_heads
        self.parallel: Optional[TensorParallel] = None  # set by LlamaForServing: the o projection's all-reduce
        self.head_dim = head_dim_of(config)
        self.scaling = self.head_dim**-0.5
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        qkv_bias, o_bias = _biases(config)
        parts = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}
        self.qkv_proj = FusedLinear(config.hidden_size, parts, qkv_bias, device="meta", dtype=dtype)
        self.o_proj = Linear(q_size, config.hidden_size, bias=o_bias, device="meta", dtype=dtype)
        self.q_norm = self.k_norm = None
        if config.model_type == "qwen3":
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, device="meta", dtype=dtype)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, device="meta", dtype=dtype)

    def project(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries [tokens, heads, dim] and keys, and values [tokens, kv_heads, dim]: views of the fused
        projection's output, whose query and key heads are rotated together in place."""
        heads, q, k, v = self.split(self.qkv_proj(hidden))
        kv_end = self.heads + self.kv_heads
        if self.q_norm is None:
            ops = self.layer_ops
            if ops is not None and ops.takes(heads, cos, sin):
                ops.rope_(heads, kv_end, cos, sin)
            else:
                rotate_(heads[:, :kv_end], cos, sin)
            return q, k, v
        return rotate_(self.q_norm(q), cos, sin), rotate_(self.k_norm(k), cos, sin), v

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection's output [tokens, (heads + 2 * kv_heads) * dim] as heads [tokens, heads + 2 * kv_heads,
        dim] and its query, key and value views."""
        heads = qkv.view(qkv.shape[0], -1, self.head_dim)
        kv_end = self.heads + self.kv_heads
        return heads, heads[:, : self.heads], heads[:, self.heads : kv_end], heads[:, kv_end:]


class MLP(nn.Module):
    """SiLU-gated MLP with gate and up fused into one matmul."""

    layer_ops: Any = None  # cpu_kernel.LayerOps on a float32 CPU model: the gated product in one pass

    def __init__(self, config: Any, dtype: torch.dtype, shard: Optional[ShardLayout] = None):
        super().__init__()
        size, bias = config.intermediate_size, bool(getattr(config, "mlp_bias", False))
        size = size if shard is None else shard.intermediate
        parts = {"gate_proj": size, "up_proj": size}
        self.gate_up_proj = FusedLinear(config.hidden_size, parts, bias, device="meta", dtype=dtype)
        self.down_proj = Linear(size, config.hidden_size, bias=bias, device="meta", dtype=dtype)
        self.parallel: Optional[TensorParallel] = None  # set by LlamaForServing: the down projection's all-reduce

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual`` + the MLP of ``x`` (its down projection adds the residual in the same GEMM where it can)."""
        gate_up, ops = self.gate_up_proj(x), self.layer_ops
        if ops is not None and ops.takes(gate_up):
            gated = ops.silu_mul(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            gated = F.silu(gate) * up
        return row_parallel_plus(self.down_proj, gated, residual, self.parallel)


def row_parallel_plus(
    layer: nn.Module, x: torch.Tensor, residual: torch.Tensor, parallel: Optional[TensorParallel]
) -> torch.Tensor:
    """``residual + layer(x)``; under tensor parallelism ``layer(x)`` is this rank's partial sum, all-reduced first."""
    if parallel is None:
        return linear_plus(layer, x, residual)
    return residual + parallel.all_reduce(layer(x))


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks with residual connections."""

    layer_ops: Any = None  # cpu_kernel.LayerOps on a float32 CPU model: each half in one call where it can (fused)

    def __init__(self, config: Any, layer_idx: int, dtype: torch.dtype, shard: Optional[ShardLayout] = None):
        super().__init__()
        self.self_attn = Attention(config, layer_idx, dtype, shard)
        self.mlp = MLP(config, dtype, shard)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device="meta", dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, device="meta", dtype=dtype)
        self._fused: tuple[tuple, Any] = ((), None)  # (what it was built from, the FusedHalves or None)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return run_layer(self, hidden, cos, sin, before_attention, after_attention)

    def fused(self) -> Any:
        """The layer's two halves as one library call each (cpu_kernel.FusedHalves) while it can run them: layer ops
        handed to it, all four linear layers on float32 panels (none wrapped by an adapter), no per-head norms, no
        tensor parallelism; None otherwise. Rebuilt when a linear layer or its panels change."""
        ops = self.layer_ops
        if ops is None:
            return None
        attn, mlp = self._modules["self_attn"]._modules, self._modules["mlp"]._modules  # dicts: no __getattr__
        parts = (attn["qkv_proj"], attn["o_proj"], mlp["gate_up_proj"], mlp["down_proj"])
        key = (ops, *parts, *[getattr(part, "packed", None) for part in parts])  # compared by identity
        if not _same_objects(self._fused[0], key):
            self._fused = (key, self._fuse(ops, parts))
        return self._fused[1]

    def _fuse(self, ops: Any, parts: tuple) -> Any:
        attn, mlp = self.self_attn, self.mlp
        on_panels = all(
            isinstance(part, Linear) and part.kernel is ops.kernel and part.packed.dtype == torch.float32
            for part in parts
        )
        if not on_panels or attn.q_norm is not None or attn.parallel is not None or mlp.parallel is not None:
            return None
        qkv, o, gate_up, down = parts
        sizes = dict(
            hidden=qkv.in_features, qkv_out=qkv.out_features, rotated_heads=attn.heads + attn.kv_heads,
            head_dim=attn.head_dim, attended=o.in_features, intermediate=down.in_features,
        )  # fmt: skip
        norms = (self.input_layernorm, self.post_attention_layernorm)
        weights = dict(
            norm_in=norms[0].weight, qkv=qkv.packed, qkv_bias=qkv.bias, o=o.packed, o_bias=o.bias,
            norm_post=norms[1].weight, gate_up=gate_up.packed, gate_up_bias=gate_up.bias, down=down.packed,
            down_bias=down.bias,
        )  # fmt: skip
        if not all(w is None or (w.dtype == torch.float32 and w.is_contiguous()) for w in weights.values()):
            return None
        return ops.fused_halves(sizes, (norms[0].eps, norms[1].eps), weights, parts)


def _same_objects(first: tuple, second: tuple) -> bool:
    """Whether two tuples hold the very same objects (tensors among them: no elementwise ``==``)."""
    return len(first) == len(second) and all(map(operator.is_, first, second))


def before_attention(
    layer: DecoderLayer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's work up to attention: input norm, fused q/k/v, q/k norms, RoPE (what COMPILE compiles)."""
    fused = layer.fused()
    if fused is not None and layer.layer_ops.takes(hidden, cos, sin):
        return layer.self_attn.split(fused.before(hidden, cos, sin))[1:]
    return layer.self_attn.project(layer.input_layernorm(hidden), cos, sin)


def after_attention(layer: DecoderLayer, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """A layer's work after attention: o projection, residual, norm, MLP, residual (what COMPILE compiles)."""
    attn, flat = layer.self_attn, attended.reshape(attended.shape[0], -1)
    fused = layer.fused()
    if fused is not None and layer.layer_ops.takes(hidden, flat):
        return fused.after(flat, hidden)
    hidden = row_parallel_plus(attn.o_proj, flat, hidden, attn.parallel)
    return layer.mlp(layer.post_attention_layernorm(hidden), hidden)


def run_layer(
    layer: DecoderLayer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, before: Any, after: Any
) -> torch.Tensor:
    """One decoder layer with its two halves given (eager, or compiled by serve/engine/compile.py) around the
    engine's attention, which always runs eagerly."""
    attn = layer.self_attn
    q, k, v = before(layer, hidden, cos, sin)
    return after(layer, hidden, attend(attn.layer_idx, q, k, v, attn.scaling))


class Decoder(nn.Module):
    """Embeddings, the decoder layers and the final norm (transformers' ``model.`` prefix)."""

    def __init__(self, config: Any, dtype: torch.dtype, shard: Optional[ShardLayout] = None):
        super().__init__()
        vocab = config.vocab_size if shard is None else shard.vocab_rows
        self.embed_tokens = nn.Embedding(vocab, config.hidden_size, device="meta", dtype=dtype)
        layers = range(config.num_hidden_layers)
        self.layers = nn.ModuleList(DecoderLayer(config, index, dtype, shard) for index in layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, device="meta", dtype=dtype)
        self.rotary = Rotary(config)


class LlamaForServing(nn.Module):
    """The whole model. Built on the meta device, then materialised (uninitialised) on ``device``: use
    ``from_config`` (random weights) or ``serve.modeling.load_pretrained`` (a checkpoint) to get a filled one.

    With ``parallel`` (tensor parallelism over ``parallel.size`` ranks) it is this rank's shard (``serve_shard``):
    its heads, MLP features and vocabulary rows; every rank runs the same forward and gets the same logits."""

    serve_calls_attend = True  # the runner does not install a transformers attention backend for this model

    def __init__(
        self,
        config: Any,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        parallel: Optional[TensorParallel] = None,
    ):
        super().__init__()
        reason = unsupported_reason(config)
        if reason is not None:
            raise ValueError(f"the lean model cannot serve this config: {reason}")
        self.config = config
        self.generation_config: Any = None
        self.parallel = parallel if parallel is not None and parallel.size > 1 else None
        self.serve_shard = None if self.parallel is None else ShardLayout.of(config, parallel.rank, parallel.size)
        self.model = Decoder(config, dtype, self.serve_shard)
        for layer in self.model.layers:
            layer.self_attn.parallel = layer.mlp.parallel = self.parallel
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        vocab = self.model.embed_tokens.num_embeddings
        self.lm_head = Linear(config.hidden_size, vocab, bias=False, device="meta", dtype=dtype)
        self.eager_layer_halves = (before_attention, after_attention)  # what the engine's COMPILE compiles
        self.layer_halves: tuple[Any, Any] = self.eager_layer_halves  # compiled ones under COMPILE
        self.serve_aux_layers: frozenset[int] = frozenset()  # layers whose input states a forward keeps (EAGLE-3)
        self.serve_aux_hidden: dict[int, torch.Tensor] = {}  # the last forward's, by layer
        self.to_empty(device=device)
        self.tie_weights()
        self.model.rotary.reset()
        self.requires_grad_(False)
        self.eval()

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (transformers' name for it)."""
        return self.model.embed_tokens

    def tie_weights(self) -> None:
        """The output head shares the embedding matrix when the config ties them."""
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def serve_kv_heads(self) -> int:
        """KV heads this model's cache holds per layer (this rank's, under tensor parallelism)."""
        return self.model.layers[0].self_attn.kv_heads

    @classmethod
    def from_config(
        cls,
        config: Any,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        parallel: Optional[TensorParallel] = None,
    ) -> "LlamaForServing":
        """Random weights, as vLLM's ``--load-format dummy``: normal(0, initializer_range) matrices, unit norms and
        zero biases, made directly on ``device`` in ``dtype``."""
        from transformers import GenerationConfig

        model = cls(config, device, dtype, parallel)
        std = float(getattr(config, "initializer_range", 0.02))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith("bias"):
                    parameter.zero_()
                elif parameter.dim() == 1:
                    parameter.fill_(1.0)
                else:
                    parameter.normal_(0.0, std)
        model.generation_config = GenerationConfig.from_model_config(config)
        return model

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        logits_to_keep: Union[int, torch.Tensor] = 0,
        **unused: Any,
    ) -> CausalOutput:
        """input_ids/position_ids [1, tokens] (one flat step) -> logits [1, rows, vocab] for the rows to keep.

        ``logits_to_keep``: a LongTensor of step positions, or an int n (the last n; 0 for all), as in transformers.
        """
        if input_ids.shape[0] != 1:
            raise ValueError("the lean model takes one flattened row of tokens per step")
        hidden = self._embed(input_ids[0])
        cos, sin = self.model.rotary(position_ids[0], hidden.dtype)  # sin: first half negated (Rotary)
        before, after = self.layer_halves
        for index, layer in enumerate(self.model.layers):
            if index in self.serve_aux_layers:
                self.serve_aux_hidden[index] = hidden
            hidden = run_layer(layer, hidden, cos, sin, before, after)
        if isinstance(logits_to_keep, torch.Tensor):
            hidden = hidden.index_select(0, logits_to_keep.to(hidden.device))
        elif logits_to_keep:
            hidden = hidden[-logits_to_keep:]
        return CausalOutput(self._logits(self.lm_head(self.model.norm(hidden)))[None])

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; under tensor parallelism each rank looks up the ids in its vocabulary rows (zeros for
        the others) and the ranks' rows are summed."""
        if self.parallel is None:
            return self.model.embed_tokens(ids)
        start, _ = self.serve_shard.vocab_range()
        local = ids - start
        outside = (local < 0) | (local >= self.serve_shard.vocab_rows)
        hidden = self.model.embed_tokens(local.clamp(0, self.serve_shard.vocab_rows - 1))
        return self.parallel.all_reduce(hidden.masked_fill_(outside[:, None], 0))

    def _logits(self, local: torch.Tensor) -> torch.Tensor:
        """The full vocabulary's logits: this rank's columns, gathered from every rank under tensor parallelism."""
        if self.parallel is None:
            return local
        return self.parallel.gather_columns(local)[:, : self.config.vocab_size]
