"""EAGLE-3 draft heads: one decoder layer that reads the target's hidden states and proposes the next tokens.

The published heads' checkpoint format (``LlamaForCausalLMEagle3``): ``fc`` folds the target's hidden states at
three of its layers (3 × hidden) into one; ``midlayer`` is a Llama decoder layer whose q/k/v read the token's
embedding and that folded state side by side (2 × hidden), each normed first (``input_layernorm``, ``hidden_norm``);
``norm`` and ``lm_head`` give logits over the head's own, smaller vocabulary, and ``d2t`` maps each of its ids to
the target's (``target = draft + d2t[draft]``). The embedding is the target's unless the checkpoint has its own.

At position p the head takes the embedding of token p + 1 and the target's state at p, and predicts token p + 2;
for its later guesses it takes its own pre-norm output in place of the target's state (``fc`` is skipped). Its
attention goes through the engine's ``attend`` over a cache of its own (one layer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from serve.engine.attention import attend
from serve.modeling.layers import FusedLinear, Linear, RMSNorm, Rotary, linear_plus
from serve.modeling.llama import MLP, Attention
from serve.modeling.weights import CheckpointMismatch, load_tensors, safetensors_files

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
IGNORED_TENSORS = ("t2d",)  # the target-to-draft mask: the head needs only d2t


def is_eagle3_config(raw: dict[str, Any]) -> bool:
    """Whether a config.json describes an EAGLE-3 head."""
    return any(name in EAGLE3_ARCHITECTURES for name in raw.get("architectures") or ())


def aux_layers_of(config: Any, target_layers: int) -> tuple[int, ...]:
    """The target layers whose input states the head reads: the checkpoint's ``eagle_aux_hidden_state_layer_ids``
    where it says, else the low, middle and high layers its training used (2, L / 2, L - 3)."""
    eagle = getattr(config, "eagle_config", None) or {}
    chosen = eagle.get("eagle_aux_hidden_state_layer_ids") if isinstance(eagle, dict) else None
    if chosen:
        return tuple(int(index) for index in chosen)
    return (2, target_layers // 2, target_layers - 3)


class Eagle3Layer(nn.Module):
    """The head's decoder layer: attention over [normed embedding, normed state], then the MLP, with the state as
    the residual."""

    def __init__(self, config: Any, dtype: torch.dtype):
        super().__init__()
        size, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, 0, dtype)
        attn = self.self_attn
        kv = attn.kv_heads * attn.head_dim
        parts = {"q_proj": attn.heads * attn.head_dim, "k_proj": kv, "v_proj": kv}
        bias = bool(getattr(config, "attention_bias", False))
        attn.qkv_proj = FusedLinear(2 * size, parts, bias, device="meta", dtype=dtype)
        self.mlp = MLP(config, dtype)
        self.input_layernorm = RMSNorm(size, eps, device="meta", dtype=dtype)
        self.hidden_norm = RMSNorm(size, eps, device="meta", dtype=dtype)
        self.post_attention_layernorm = RMSNorm(size, eps, device="meta", dtype=dtype)
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(self, embeds: torch.Tensor, state: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The layer's output state (before the head's final norm) [tokens, hidden]."""
        normed = self.hidden_norm(state)
        residual = normed if self.norm_before_residual else state
        joined = torch.cat((self.input_layernorm(embeds), normed), dim=-1)
        attn = self.self_attn
        q, k, v = attn.project(joined, cos, sin)
        attended = attend(0, q, k, v, attn.scaling)
        residual = linear_plus(attn.o_proj, attended.reshape(attended.shape[0], -1), residual)
        return self.mlp(self.post_attention_layernorm(residual), residual)


class Eagle3Head(nn.Module):
    """An EAGLE-3 head on ``device`` in ``dtype`` (uninitialised until loaded: ``load_eagle3_head``)."""

    serve_calls_attend = True
    serve_eagle3 = True  # the engine proposes with it as EAGLE-3 (serve/engine/eagle3.py)

    def __init__(self, config: Any, target_layers: int, own_embedding: bool, device: Any, dtype: torch.dtype):
        super().__init__()
        self.config = config
        size = config.hidden_size
        self.target_hidden = int(getattr(config, "target_hidden_size", None) or size)
        self.aux_layers = aux_layers_of(config, target_layers)
        self.draft_vocab = int(getattr(config, "draft_vocab_size", None) or config.vocab_size)
        self.fc = Linear(len(self.aux_layers) * self.target_hidden, size, bias=False, device="meta", dtype=dtype)
        self.midlayer = Eagle3Layer(config, dtype)
        self.norm = RMSNorm(size, config.rms_norm_eps, device="meta", dtype=dtype)
        self.lm_head = Linear(size, self.draft_vocab, bias=False, device="meta", dtype=dtype)
        self.embed_tokens = nn.Embedding(config.vocab_size, size, device="meta", dtype=dtype) if own_embedding else None
        self.rotary = Rotary(config)
        self.register_buffer("d2t", torch.empty(self.draft_vocab, dtype=torch.long, device="meta"))
        self.to_empty(device=device)
        self.d2t.zero_()
        self.rotary.reset()
        self.requires_grad_(False)
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def fold(self, aux: list[torch.Tensor]) -> torch.Tensor:
        """The target's states at the head's layers [tokens, hidden] each -> the head's input state [tokens, hidden]."""
        return self.fc(torch.cat([state.to(self.fc.weight.dtype) for state in aux], dim=-1))

    def forward(
        self, embeds: torch.Tensor, state: torch.Tensor, positions: torch.Tensor, keep: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the target ids of the head's greedy guesses, its pre-norm output states) at the rows ``keep`` (all
        when None): ``embeds`` of the tokens after each position, ``state`` the target's (folded) or the head's own."""
        cos, sin = self.rotary(positions, embeds.dtype)
        out = self.midlayer(embeds, state.to(embeds.dtype), cos, sin)
        if keep is not None:
            out = out.index_select(0, keep)
        draft_ids = self.lm_head(self.norm(out)).argmax(dim=-1)
        return draft_ids + self.d2t[draft_ids], out


def load_eagle3_head(
    folder: Path, target: Any, device: Union[str, torch.device], dtype: torch.dtype, allow_pickle: bool = False
) -> Eagle3Head:
    """The head in ``folder`` (config.json, then safetensors, or pytorch_model.bin where ``allow_pickle``) for
    ``target``, on its device in ``dtype``; CheckpointMismatch when it is not an EAGLE-3 head or does not fit."""
    from transformers import AutoConfig

    raw = json.loads((folder / "config.json").read_text())
    if not is_eagle3_config(raw):
        raise CheckpointMismatch(
            f"{folder} is not an EAGLE-3 head: its architectures are {raw.get('architectures')}, expected one of "
            f"{', '.join(EAGLE3_ARCHITECTURES)}"
        )
    config = AutoConfig.from_pretrained(str(folder))
    tensors = dict(_checkpoint_tensors(folder, allow_pickle))
    target_config = target.config.get_text_config()
    head = Eagle3Head(config, target_config.num_hidden_layers, "embed_tokens.weight" in tensors, device, dtype)
    _check_fits(head, target_config)
    d2t = tensors.pop("d2t", None)
    if d2t is not None:
        head.d2t.copy_(d2t.to(torch.long))
    elif head.draft_vocab != config.vocab_size:
        raise CheckpointMismatch(f"{folder}: a head of {head.draft_vocab} draft ids needs a d2t tensor")
    load_tensors(head, ((name, tensor) for name, tensor in tensors.items() if name not in IGNORED_TENSORS))
    _check_ids(head, target_config.vocab_size)
    return head


def _checkpoint_tensors(folder: Path, allow_pickle: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors by the head's names (``layers.0.`` is the published ``midlayer.``)."""
    files = safetensors_files(folder)
    pickled = folder / "pytorch_model.bin"
    if files:
        from safetensors.torch import load_file

        tensors = {name: tensor for path in files for name, tensor in load_file(str(path)).items()}
    elif pickled.is_file() and allow_pickle:
        tensors = torch.load(pickled, map_location="cpu", weights_only=True)
    elif pickled.is_file():
        raise CheckpointMismatch(
            f"{folder} holds pickle weights (pytorch_model.bin), refused unless ALLOW_PICKLE_WEIGHTS=true"
        )
    else:
        raise CheckpointMismatch(f"{folder} holds no safetensors weights or pytorch_model.bin")
    for name, tensor in tensors.items():
        name = name.removeprefix("model.")
        yield ("midlayer." + name.removeprefix("layers.0.") if name.startswith("layers.0.") else name), tensor


def _check_fits(head: Eagle3Head, target_config: Any) -> None:
    """CheckpointMismatch when the head reads states or layers the target has not."""
    layers, hidden = target_config.num_hidden_layers, target_config.hidden_size
    if head.target_hidden != hidden:
        raise CheckpointMismatch(f"the head reads states of size {head.target_hidden}; the target's are {hidden}")
    outside = [index for index in head.aux_layers if not 0 <= index < layers]
    if outside:
        raise CheckpointMismatch(f"the head reads layers {list(head.aux_layers)}; the target has {layers}")
    if head.embed_tokens is None and head.config.hidden_size != hidden:
        raise CheckpointMismatch(
            f"the head's hidden size {head.config.hidden_size} differs from the target's {hidden} and it has no "
            "embedding of its own"
        )


def _check_ids(head: Eagle3Head, vocab: int) -> None:
    """CheckpointMismatch when a draft id maps outside the target's vocabulary."""
    mapped = torch.arange(head.draft_vocab, device=head.d2t.device) + head.d2t
    if int(mapped.min()) < 0 or int(mapped.max()) >= vocab:
        raise CheckpointMismatch(
            f"the head's d2t maps draft ids to {int(mapped.min())}..{int(mapped.max())}, outside the target's "
            f"vocabulary of {vocab}"
        )
