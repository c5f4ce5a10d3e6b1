"""Repetition, frequency and presence penalties from token counts kept on the device.

Each running sequence that asks for a penalty owns one row of a [rows, 2, vocab] int32 matrix: channel 0 counts
its prompt and output tokens (repetition penalty: "seen"), channel 1 its output tokens only (OpenAI's frequency
and presence penalties). A row is filled once, from the sequence's tokens, when it first needs penalties; after
that each sampled token bumps it on the device. So a step copies no token histories, and the penalties are one
batched tensor expression over the penalized rows, with no Python loop over rows or the vocabulary.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from serve.engine.types import SamplingParams
from serve.engine.uploads import Uploads, default_uploads

SEEN, OUTPUT = 0, 1


def penalized(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or bool(params.frequency_penalty) or bool(params.presence_penalty)


class TokenCounts:
    """Rows of token counts on ``device``, one per penalized sequence (by request id), grown on demand; token ids
    and rows go to the device through ``uploads`` (the runner's)."""

    def __init__(self, vocab: int, device: torch.device, uploads: Optional[Uploads] = None):
        self.vocab, self.device = vocab, device
        self.uploads = default_uploads(device, uploads)
        self.matrix = torch.zeros(0, 2, vocab, dtype=torch.int32, device=device)
        self._row_of: dict[str, int] = {}
        self._free: list[int] = []

    def rows(self, ids: Sequence[str], tokens: Sequence[tuple[list[int], list[int]]]) -> list[int]:
        """The row of each sequence (``ids``), filled from its (prompt, output) tokens when new."""
        rows = []
        for request_id, (prompt, output) in zip(ids, tokens):
            row = self._row_of.get(request_id)
            if row is None:
                row = self._row_of[request_id] = self._take_row()
                self._fill(row, self.uploads.tensor(prompt + output, torch.long), len(prompt))
            rows.append(row)
        return rows

    def _fill(self, row: int, tokens: torch.Tensor, prompt_length: int) -> None:
        """Count ``tokens`` (the prompt's first) into ``row``, on the device: a scatter-add, since ``bincount``
        on CUDA reads its largest id back to the host."""
        self.matrix[row].zero_()
        ones = torch.ones_like(tokens, dtype=torch.int32)
        self.matrix[row, SEEN].scatter_add_(0, tokens, ones)
        self.matrix[row, OUTPUT].scatter_add_(0, tokens[prompt_length:], ones[prompt_length:])

    def release(self, request_id: str) -> None:
        """Give a finished sequence's row back (zeroed when next taken)."""
        row = self._row_of.pop(request_id, None)
        if row is not None:
            self._free.append(row)

    def _take_row(self) -> int:
        if not self._free:
            grown = max(4, 2 * self.matrix.shape[0])
            extra = torch.zeros(grown - self.matrix.shape[0], 2, self.vocab, dtype=torch.int32, device=self.device)
            self._free = list(range(self.matrix.shape[0], grown))[::-1]
            self.matrix = torch.cat([self.matrix, extra])
        return self._free.pop()


def apply_penalties(
    logits: torch.Tensor, params: Sequence[SamplingParams], counts: TokenCounts, rows: Sequence[Optional[int]]
) -> torch.Tensor:
    """Penalize the rows of ``logits`` whose ``rows[i]`` (their count row) is not None, in one batched pass."""
    picked = [i for i, row in enumerate(rows) if row is not None]
    if not picked:
        return logits
    packed = counts.uploads.tensor([[i, rows[i]] for i in picked], torch.long)
    knobs = counts.uploads.tensor(
        [[params[i].repetition_penalty, params[i].frequency_penalty, params[i].presence_penalty] for i in picked],
        torch.float32,
    )
    index, matrix_rows = packed[:, 0], packed[:, 1]
    seen, output = counts.matrix[matrix_rows, SEEN], counts.matrix[matrix_rows, OUTPUT].to(logits.dtype)
    repetition, frequency, presence = (knobs[:, k : k + 1] for k in range(3))
    selected = logits[index]
    damped = torch.where(selected > 0, selected / repetition, selected * repetition)
    selected = torch.where(seen > 0, damped, selected)
    logits[index] = selected - frequency * output - presence * (output > 0).to(logits.dtype)
    return logits


def count_sampled(counts: TokenCounts, rows: Sequence[Optional[int]], tokens: torch.Tensor) -> None:
    """Add each penalized row's sampled token to its counts (on the device)."""
    picked = [i for i, row in enumerate(rows) if row is not None]
    if not picked:
        return
    packed = counts.uploads.tensor([[i, rows[i]] for i in picked], torch.long)
    sampled = tokens[packed[:, 0]]
    counts.matrix[packed[:, 1], SEEN, sampled] += 1
    counts.matrix[packed[:, 1], OUTPUT, sampled] += 1
