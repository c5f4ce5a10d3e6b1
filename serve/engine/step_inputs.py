"""One step's model inputs as plain lists (what a tensor-parallel rank receives), and their tensors on a device.

The runner lays a step out once (decode tokens first, then each prompt chunk); ``StepInputs`` holds that layout
without tensors, so the same object is sent to every other rank in one message and turned into tensors by each.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from serve.engine.attention import PrefillChunk, StepLayout
from serve.engine.uploads import Uploads

Span = tuple[Any, int, int, int]  # (sequence, its first row in the step, its first position, its token count)


@dataclass
class StepInputs:
    """The flattened step: token ids, positions, cache rows, decode block tables, prompt chunks, kept logit rows."""

    ids: list[int]
    positions: list[int]
    rows: list[int]  # flat cache row of each token: block * block_size + offset
    decode_tables: list[list[int]]  # each decode sequence's block table, padded with the scratch block
    decode_lengths: list[int]  # cached tokens each decode sequence sees, the new one included
    chunks: list[tuple[int, int, int, list[int]]]  # (start, end, cached before, block table) of each prompt chunk
    logit_rows: list[int]  # the step positions whose logits are kept
    adapters: Optional[list[Optional[str]]] = None  # each token's LoRA adapter (None: no adapter in the step)
    # a vision-language model's step (never sent to other ranks: such models run on one):
    image_rows: list[int] = field(default_factory=list)  # the step positions that take an image feature
    image_features: Any = None  # [image rows, hidden] their features, in order (None: no image token in the step)
    rope_positions: Any = None  # [3, tokens] M-RoPE positions (None: ``positions`` in all three)
    fed: list[tuple[int, int]] = field(default_factory=list)  # (row, row of the pending step's tokens): ids on device

    def tensors(self, uploads: Uploads, block_size: int) -> tuple[torch.Tensor, torch.Tensor, StepLayout, torch.Tensor]:
        """(input ids, positions, the attention layout, logit rows) on the device of ``uploads``, which sends them
        from reused staging buffers without a blocking copy."""
        device = uploads.device
        as_tensor = lambda values: uploads.tensor(values, torch.long)  # noqa: E731
        on_host = device.type == "cpu"  # the gathering reference attends there: its masks built once per step
        mask = lambda position, count: chunk_mask(position, count) if on_host else None  # noqa: E731
        chunks = [
            PrefillChunk(start, end, position, as_tensor(blocks), mask(position, end - start))
            for start, end, position, blocks in self.chunks
        ]
        tables, mask = None, None
        if self.decode_tables:
            tables = as_tensor(self.decode_tables)
            span = torch.arange(tables.shape[1] * block_size, device=device)
            mask = (span[None, :] < as_tensor(self.decode_lengths)[:, None])[:, None, None, :]
        layout = StepLayout(as_tensor(self.rows), len(self.decode_tables), tables, mask, chunks)
        return as_tensor(self.ids), as_tensor(self.positions), layout, as_tensor(self.logit_rows)


def chunk_mask(position: int, count: int) -> Optional[torch.Tensor]:
    """Causal mask, on the CPU, for a chunk that starts after ``position`` cached tokens (None: plain causal from 0).
    Only the CPU's gathering reference reads it; on a GPU the paged prefill kernel needs none and the reference, where
    it falls back, builds its own on the device."""
    if position == 0:
        return None
    rows = torch.arange(count)[:, None] + position
    return torch.arange(position + count)[None, :] <= rows
