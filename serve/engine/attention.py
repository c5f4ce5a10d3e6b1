"""Attention over the slot KV cache, registered as a transformers attention backend.

The runner flattens every token of a step (decode tokens of running sequences, prompt chunks of new ones) into one
row, so the model's linear layers see one [1, tokens, hidden] batch. transformers then calls ``slot_attention`` in
each layer with the step's rotated keys and values: we write them into their slots and attend per sequence — all
decode tokens in one batched call, each prompt chunk causally over its own slot.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from serve.engine.kv_cache import SlotKVCache

BACKEND_NAME = "serve_slots"


@dataclass
class PrefillChunk:
    """Prompt tokens [start, end) of the flattened step, for the sequence in ``slot`` starting at ``position``."""

    start: int
    end: int
    slot: int
    position: int
    mask: Optional[torch.Tensor]  # [chunk, position + chunk] causal mask; None when position == 0


@dataclass
class StepLayout:
    """Where every token of one step goes in the cache and what it attends to."""

    rows: torch.Tensor  # [tokens] flat cache row of each token: slot * slot_tokens + position
    decode_tokens: torch.Tensor  # indices (into the step) of decode tokens
    decode_slots: torch.Tensor  # their slots
    decode_span: int  # decode attention reads slots [0, span)
    decode_mask: Optional[torch.Tensor]  # [span, 1, 1, longest] which cached positions each slot may see
    prefills: list[PrefillChunk]
    _copies: dict = field(default_factory=dict, repr=False)

    def on(self, device: torch.device) -> "StepLayout":
        """This layout with its tensors on ``device`` (copied once per step for each other GPU of a split model)."""
        if device == self.rows.device:
            return self
        if device not in self._copies:
            move = lambda tensor: None if tensor is None else tensor.to(device)  # noqa: E731
            self._copies[device] = StepLayout(
                move(self.rows), move(self.decode_tokens), move(self.decode_slots), self.decode_span, move(self.decode_mask),
                [replace(chunk, mask=move(chunk.mask)) for chunk in self.prefills],
            )
        return self._copies[device]


_active = threading.local()


class active_step:
    """Context manager: the cache and layout ``slot_attention`` uses during one forward pass."""

    def __init__(self, cache: SlotKVCache, layout: StepLayout):
        self.state = (cache, layout)

    def __enter__(self) -> None:
        _active.state = self.state

    def __exit__(self, *exc: Any) -> None:
        _active.state = None


def slot_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, scaling: Optional[float] = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim] ->
    output [1, tokens, heads, dim]."""
    out = attend(module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), scaling)
    return out.unsqueeze(0), None


def attend(layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: Optional[float]) -> torch.Tensor:
    """Attention of one layer for every token of the active step, over the KV cache.

    query [tokens, heads, dim], key/value [tokens, kv_heads, dim] (rotated) -> [tokens, heads, dim]. The step's new
    keys and values are written into the cache first. Any model (transformers' or our own) calls this per layer.
    """
    cache, layout = _active.state
    layout = layout.on(key.device)  # a model split over GPUs: this layer's cache lives on this layer's GPU
    cache.write(layer, layout.rows, key, value)
    keys, values = cache.keys[layer], cache.values[layer]  # [slots, tokens, kv_heads, dim]
    q = query.transpose(0, 1)  # [heads, tokens, dim]
    out = q.new_empty(q.shape[1], q.shape[0], q.shape[2])  # [tokens, heads, dim]
    if layout.decode_tokens.numel():
        out[layout.decode_tokens] = _decode_attention(q, keys, values, layout, scaling)
    for chunk in layout.prefills:
        out[chunk.start : chunk.end] = _prefill_attention(q, keys, values, chunk, scaling)
    return out


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, layout: StepLayout, scaling: Optional[float]) -> torch.Tensor:
    """One new token per slot, against that slot's cache; idle slots in the span compute and are discarded."""
    span, longest = layout.decode_span, layout.decode_mask.shape[-1]
    batched_q = q.new_zeros(span, q.shape[0], 1, q.shape[2])
    batched_q[layout.decode_slots] = q[:, layout.decode_tokens].transpose(0, 1).unsqueeze(2)
    out = F.scaled_dot_product_attention(
        batched_q, keys[:span, :longest].transpose(1, 2), values[:span, :longest].transpose(1, 2),
        attn_mask=layout.decode_mask, scale=scaling, enable_gqa=True,
    )
    return out[layout.decode_slots, :, 0]


def _prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, chunk: PrefillChunk, scaling: Optional[float]) -> torch.Tensor:
    """A prompt chunk attends causally to its own earlier chunks and itself."""
    seen = chunk.position + chunk.end - chunk.start
    out = F.scaled_dot_product_attention(
        q[:, chunk.start : chunk.end].unsqueeze(0),
        keys[chunk.slot : chunk.slot + 1, :seen].transpose(1, 2),
        values[chunk.slot : chunk.slot + 1, :seen].transpose(1, 2),
        attn_mask=chunk.mask, is_causal=chunk.mask is None, scale=scaling, enable_gqa=True,
    )
    return out[0].transpose(0, 1)


AttentionInterface.register(BACKEND_NAME, slot_attention)
