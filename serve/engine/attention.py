"""Attention over the paged KV cache, registered as a transformers attention backend.

The runner flattens every token of a step (decode tokens of running sequences first, then prompt chunks of new
ones) into one row, so the model's linear layers see one [1, tokens, hidden] batch. Each attention layer then
calls ``attend`` with the step's rotated keys and values: they are written into their blocks, then all decode
tokens attend in one batched call over their sequences' blocks, and each prompt chunk attends causally over its
own sequence's earlier blocks and itself. Grouped-query heads are handled by viewing the queries as
[batch, kv_heads, group, dim] against the shared keys: no K/V copies per head group.

Decode attention runs the kernel installed for the cache (serve/engine/decode_backends.py: an in-place Triton or
CPU kernel); ``_decode_attention``, which gathers each sequence's blocks into a copy, is the reference and the
fallback. Likewise prompt chunks go to the prefill kernel installed for the cache (the in-place Triton kernel of
serve/engine/paged_triton_prefill.py), all chunks of a step in one launch; ``_prefill_attention``, which gathers a
later chunk's prefix and masks it densely, is the reference and the fallback.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from serve.engine.kv_cache import PagedKVCache, dequantize

BACKEND_NAME = "serve_paged"


@dataclass
class PrefillChunk:
    """Prompt tokens [start, end) of the flattened step; ``position`` tokens of the sequence are cached before it."""

    start: int
    end: int
    position: int
    blocks: torch.Tensor  # the sequence's block ids covering positions [0, position + end - start)
    mask: Optional[torch.Tensor] = None  # [chunk, position + chunk] causal mask (None: the reference builds it)


@dataclass(frozen=True)
class ChunkBatch:
    """A step's prompt chunks as one kernel's inputs, on the layout's device."""

    spans: torch.Tensor  # [3, chunks]: each chunk's first row in the step, its length, the tokens cached before it
    tables: torch.Tensor  # [chunks, width] each chunk's block table, padded with block 0
    longest: int  # the longest chunk's length (sizes the grid)


@dataclass(frozen=True)
class ChunkRows:
    """Prompt tokens as rows of a decode kernel: each attends over its sequence's blocks up to its own position."""

    index: torch.Tensor  # [rows] the rows' places in the step
    span: Optional[tuple[int, int]]  # (first, end) when those places are consecutive, else None
    tables: torch.Tensor  # [rows, width] each row's sequence's block table, padded with block 0
    lengths: torch.Tensor  # [rows] cached positions each row sees: its position + 1


@dataclass
class StepLayout:
    """Where every token of one step goes in the cache and what it attends to."""

    rows: torch.Tensor  # [tokens] flat cache row of each token: block * block_size + offset
    decode_count: int  # the step's first decode_count tokens are decode tokens, one per sequence
    decode_blocks: Optional[torch.Tensor]  # [decode, width] each decode sequence's block table, padded with scratch
    decode_mask: Optional[torch.Tensor]  # [decode, 1, 1, width * block_size] which cached positions each may see
    prefills: list[PrefillChunk]
    _copies: dict = field(default_factory=dict, repr=False)
    _lengths: Optional[torch.Tensor] = field(default=None, repr=False)
    _chunk_batch: Optional[ChunkBatch] = field(default=None, repr=False)
    _chunk_rows: dict = field(default_factory=dict, repr=False)

    def decode_lengths(self) -> torch.Tensor:
        """[decode] how many cached positions each decode sequence sees: its mask counted on the device, once a
        step (no host read, so a captured graph replays it)."""
        if self._lengths is None:
            self._lengths = self.decode_mask.reshape(self.decode_count, -1).sum(-1)
        return self._lengths

    def chunk_batch(self) -> ChunkBatch:
        """The prompt chunks as kernel inputs, built once a step (one small upload; tables padded on the device)."""
        if self._chunk_batch is None:
            chunks, device = self.prefills, self.rows.device
            lengths = [chunk.end - chunk.start for chunk in chunks]
            spans = [[chunk.start for chunk in chunks], lengths, [chunk.position for chunk in chunks]]
            tables = torch.nn.utils.rnn.pad_sequence([chunk.blocks for chunk in chunks], batch_first=True)
            self._chunk_batch = ChunkBatch(torch.tensor(spans, dtype=torch.long, device=device), tables, max(lengths))
        return self._chunk_batch

    def chunk_rows(self, chunks: tuple[int, ...]) -> ChunkRows:
        """The tokens of the prompt chunks numbered ``chunks`` as decode-kernel rows, built once a step."""
        if chunks not in self._chunk_rows:
            picked = [self.prefills[number] for number in chunks]
            index, lengths, which = [], [], []
            for number, chunk in zip(chunks, picked):
                count = chunk.end - chunk.start
                index.extend(range(chunk.start, chunk.end))
                lengths.extend(range(chunk.position + 1, chunk.position + count + 1))
                which.extend([number] * count)
            tables = self.chunk_batch().tables
            as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=tables.device)  # noqa: E731
            span = (index[0], index[-1] + 1) if index[-1] + 1 - index[0] == len(index) else None
            rows = ChunkRows(as_tensor(index), span, tables[as_tensor(which)], as_tensor(lengths))
            self._chunk_rows[chunks] = rows
        return self._chunk_rows[chunks]

    def on(self, device: torch.device) -> "StepLayout":
        """This layout with its tensors on ``device`` (copied once per step for each other GPU of a split model)."""
        if device == self.rows.device:
            return self
        if device not in self._copies:
            move = lambda tensor: None if tensor is None else tensor.to(device)  # noqa: E731
            self._copies[device] = StepLayout(
                move(self.rows),
                self.decode_count,
                move(self.decode_blocks),
                move(self.decode_mask),
                [replace(chunk, blocks=move(chunk.blocks), mask=move(chunk.mask)) for chunk in self.prefills],
            )
        return self._copies[device]


_active = threading.local()

Scales = Optional[tuple[torch.Tensor, torch.Tensor]]  # an fp8 cache's (key, value) scales of a layer (kv_cache.py)
DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, StepLayout, Optional[float], Scales], torch.Tensor]
_decode_kernels: "weakref.WeakKeyDictionary[PagedKVCache, DecodeKernel]" = weakref.WeakKeyDictionary()
PrefillKernel = Callable[  # writes chunks' rows of its last argument, the step's output; returns the chunks it left
    [torch.Tensor, torch.Tensor, torch.Tensor, StepLayout, Optional[float], Scales, torch.Tensor],
    Optional[list[int]],
]
_prefill_kernels: "weakref.WeakKeyDictionary[PagedKVCache, PrefillKernel]" = weakref.WeakKeyDictionary()


def use_decode_kernel(cache: PagedKVCache, kernel: Optional[DecodeKernel]) -> None:
    """Decode attention over ``cache`` runs ``kernel`` (None: the gathering reference, ``_decode_attention``)."""
    if kernel is None:
        _decode_kernels.pop(cache, None)
    else:
        _decode_kernels[cache] = kernel


def use_prefill_kernel(cache: PagedKVCache, kernel: Optional[PrefillKernel]) -> None:
    """Prompt chunks over ``cache`` run ``kernel``, which writes the chunks' rows of the output it is given and
    returns the numbers of any it left (None: it left none) to the gathering reference, ``_prefill_attention``,
    which also takes every chunk where no kernel is installed."""
    if kernel is None:
        _prefill_kernels.pop(cache, None)
    else:
        _prefill_kernels[cache] = kernel


class active_step:
    """Context manager: the cache and layout ``paged_attention`` uses during one forward pass."""

    def __init__(self, cache: PagedKVCache, layout: StepLayout):
        self.state = (cache, layout)

    def __enter__(self) -> None:
        _active.state = self.state

    def __exit__(self, *exc: Any) -> None:
        _active.state = None


def paged_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: Optional[float] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim] ->
    output [1, tokens, heads, dim]."""
    out = attend(module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), scaling)
    return out.unsqueeze(0), None


def attend(
    layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: Optional[float]
) -> torch.Tensor:
    """Attention of one layer for every token of the active step, over the KV cache.

    query [tokens, heads, dim], key/value [tokens, kv_heads, dim] (rotated) -> [tokens, heads, dim]. The step's new
    keys and values are written into the cache first. Any model (transformers' or our own) calls this per layer.
    """
    cache, layout = _active.state
    layout = layout.on(key.device)  # a model split over GPUs: this layer's cache lives on this layer's GPU
    cache.write(layer, layout.rows, key, value, calibrate=bool(layout.prefills))
    keys, values = cache.keys[layer], cache.values[layer]  # [blocks, block_size, kv_heads, dim]
    scales = cache.layer_scales(layer)  # None unless the cache stores fp8
    decode = _decode_kernels.get(cache, _decode_attention)
    if not layout.prefills:
        return decode(query, keys, values, layout, scaling, scales)
    out = torch.empty_like(query)
    if layout.decode_count:
        out[: layout.decode_count] = decode(query, keys, values, layout, scaling, scales)
    prefill = _prefill_kernels.get(cache)
    every = range(len(layout.prefills))
    left = every if prefill is None else prefill(query, keys, values, layout, scaling, scales, out)
    for number in left or ():
        chunk = layout.prefills[number]
        out[chunk.start : chunk.end] = _prefill_attention(query, key, value, keys, values, chunk, scaling, scales)
    return out


def _decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    layout: StepLayout,
    scaling: Optional[float],
    scales: Scales = None,
) -> torch.Tensor:
    """One new token per sequence against that sequence's blocks: [decode, heads, dim]; ``scales``: an fp8 cache's
    (key, value) scales, by which the gathered blocks are multiplied."""
    count, heads, dim = layout.decode_count, query.shape[1], query.shape[2]
    kv_heads = keys.shape[2]
    key_scale, value_scale = scales or (None, None)
    q = query[:count].reshape(count, kv_heads, heads // kv_heads, dim)  # head h reads kv head h // group
    k = dequantize(keys[layout.decode_blocks], key_scale, query.dtype)  # [decode, width, block_size, kv_heads, dim]
    v = dequantize(values[layout.decode_blocks], value_scale, query.dtype)
    k, v = k.flatten(1, 2).transpose(1, 2), v.flatten(1, 2).transpose(1, 2)  # [decode, kv_heads, positions, dim]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.decode_mask, scale=scaling)
    return out.reshape(count, heads, dim)


def _prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    chunk: PrefillChunk,
    scaling: Optional[float],
    scales: Scales = None,
) -> torch.Tensor:
    """A prompt chunk attends causally to its sequence's cached tokens and itself: [chunk, heads, dim] (``scales``:
    an fp8 cache's, for its gathered prefix)."""
    mask = chunk.mask
    if chunk.position == 0:  # nothing cached before it: the step's own keys and values, no gather
        k, v = key[chunk.start : chunk.end], value[chunk.start : chunk.end]
    else:
        seen = chunk.position + chunk.end - chunk.start
        k, v = keys[chunk.blocks].flatten(0, 1)[:seen], values[chunk.blocks].flatten(0, 1)[:seen]
        if scales is not None:
            k, v = dequantize(k, scales[0], query.dtype), dequantize(v, scales[1], query.dtype)
        if mask is None:
            rows = torch.arange(chunk.end - chunk.start, device=query.device)[:, None] + chunk.position
            mask = torch.arange(seen, device=query.device)[None, :] <= rows
    out = F.scaled_dot_product_attention(
        query[chunk.start : chunk.end].transpose(0, 1)[None],
        k.transpose(0, 1)[None].to(query.dtype),
        v.transpose(0, 1)[None].to(query.dtype),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scaling,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


AttentionInterface.register(BACKEND_NAME, paged_attention)
