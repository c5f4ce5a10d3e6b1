"""Decode steps over fixed shapes, so that a GPU can replay them as CUDA graphs.

A decode-only step is padded to a batch-size bucket (1, 2, 4, 8, 16, 24, 32, 48, 64, ...) and its block tables to
a width bucket (a power of two of blocks). Its inputs live in static device buffers: [ids | positions | cache rows
| lengths] laid out per shape, and a persistent [max batch, max blocks] block-table array whose rows are kept from
step to step: a step writes only the entries that changed (a new block, a sequence that joined or moved), so the
host neither rebuilds nor uploads whole tables. Both go in ONE non-blocking copy from a pinned staging buffer
(serve/engine/uploads.py). Padded rows read and write the scratch block only. The forward over a shape is the
same code eager (the CPU, or a shape without a graph) and captured (serve/engine/graphs.py), so the CPU tests
prove the path the GPU replays.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Optional

import torch

from serve.engine.attention import StepLayout, active_step
from serve.engine.block_manager import SCRATCH_BLOCK
from serve.engine.kv_cache import PagedKVCache
from serve.engine.uploads import Uploads

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
MIN_WIDTH_BLOCKS = 4


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes a decode step is padded to, up to (and including) ``max_batch``."""
    return [size for size in BATCH_BUCKETS if size < max_batch] + [max_batch]


def width_buckets(max_blocks: int) -> list[int]:
    """Block-table widths: powers of two from MIN_WIDTH_BLOCKS, and ``max_blocks`` itself."""
    widths, width = [], MIN_WIDTH_BLOCKS
    while width < max_blocks:
        widths.append(width)
        width *= 2
    return widths + [max_blocks]


def _fit(value: int, buckets: list[int]) -> int:
    return buckets[bisect.bisect_left(buckets, value)]


def _common_prefix(old: list[int], new: list[int]) -> int:
    """How many leading entries ``old`` and ``new`` share (all of ``old`` when ``new`` only appended)."""
    if new[: len(old)] == old:
        return len(old)
    for index, (a, b) in enumerate(zip(old, new)):
        if a != b:
            return index
    return min(len(old), len(new))


class TableRows:
    """What each row of the persistent block-table array holds (entries past a row's list are the scratch block),
    so that a step writes only what changed."""

    def __init__(self, max_batch: int, max_blocks: int):
        self.max_blocks = max_blocks
        self.written: list[list[int]] = [[] for _ in range(max_batch)]

    def changes(self, tables: list[list[int]], batch: int) -> tuple[list[int], list[int]]:
        """(flat indices, block ids) that turn rows 0..batch-1 into ``tables`` (the rows past them: scratch)."""
        indices: list[int] = []
        blocks: list[int] = []
        for row in range(batch):
            new, old = tables[row] if row < len(tables) else [], self.written[row]
            if len(new) == len(old) and new == old:
                continue
            same = _common_prefix(old, new)
            start = row * self.max_blocks
            indices.extend(range(start + same, start + max(len(new), len(old))))
            blocks.extend(new[same:])
            blocks.extend([SCRATCH_BLOCK] * (len(old) - max(len(new), same)))
            self.written[row] = list(new)  # a copy: a sequence's table changes in place
        return indices, blocks


class StaticDecode:
    """Static input buffers and the forward of one decode shape (batch bucket, width bucket)."""

    def __init__(self, model: Any, cache: PagedKVCache, device: torch.device, max_batch: int, max_blocks: int):
        self.model, self.cache, self.device = model, cache, device
        self.max_batch = max_batch  # rows one step may hold
        self.batches, self.widths = batch_buckets(max_batch), width_buckets(max_blocks)
        self.inputs = torch.zeros(4 * max_batch, dtype=torch.long, device=device)
        self.tables = torch.full((max_batch, max_blocks), SCRATCH_BLOCK, dtype=torch.long, device=device)
        self.rows = TableRows(max_batch, max_blocks)
        self.uploads = Uploads(device)
        self.logit_rows = torch.arange(max_batch, device=device)
        self.replay: dict[tuple[int, int], Callable[[], torch.Tensor]] = {}  # captured shapes (graphs.py)
        # Pad to buckets where graphs replay fixed shapes (CUDA). Eagerly, padding only adds work (padded rows run
        # the whole model, wider tables gather more KV), so the CPU runs each step at its exact shape; tests that
        # prove the padded path on the CPU turn this on.
        self.pad = device.type == "cuda"

    def shape_for(self, batch: int, widest: int) -> tuple[int, int]:
        """The smallest (batch, width) bucket that holds ``batch`` sequences of up to ``widest`` blocks (the exact
        shape when not padding)."""
        if not self.pad:
            return batch, widest
        return _fit(batch, self.batches), _fit(widest, self.widths)

    def load(self, rows: list[tuple[int, int, list[int]]], shape: Optional[tuple[int, int]] = None) -> tuple[int, int]:
        """Copy one step's (token id, position, block table) per sequence into the static buffers (of the tables,
        only the entries that changed); its shape (the smallest bucket that holds them unless ``shape`` is given)."""
        block_size = self.cache.block_size
        batch, width = shape or self.shape_for(len(rows), max(len(table) for _, _, table in rows))
        pad = batch - len(rows)
        ids = [token for token, _, _ in rows] + [0] * pad
        positions = [position for _, position, _ in rows] + [0] * pad
        cache_rows = [table[p // block_size] * block_size + p % block_size for _, p, table in rows] + [0] * pad
        lengths = [position + 1 for _, position, _ in rows] + [1] * pad
        indices, blocks = self.rows.changes([table for _, _, table in rows], batch)
        sent = self.uploads.tensor(ids + positions + cache_rows + lengths + indices + blocks, torch.long)
        self.inputs[: 4 * batch].copy_(sent[: 4 * batch])
        if indices:
            changed = sent[4 * batch :].view(2, -1)
            self.tables.view(-1).scatter_(0, changed[0], changed[1])
        return batch, width

    def forward(self, batch: int, width: int) -> torch.Tensor:
        """Logits [batch, vocab] of the loaded step: a captured graph's replay when there is one, else eager."""
        replay = self.replay.get((batch, width))
        return replay() if replay is not None else self.run(batch, width)

    def run(self, batch: int, width: int) -> torch.Tensor:
        """The eager forward of one shape over the static buffer (also what graphs.py captures)."""
        ids, positions, rows, lengths = self.inputs[: 4 * batch].view(4, batch)
        tables = self.tables[:batch, :width].contiguous()  # kernels take [batch, width] tables, as uploaded before
        span = torch.arange(width * self.cache.block_size, device=self.device)
        mask = (span[None, :] < lengths[:, None])[:, None, None, :]
        layout = StepLayout(rows, batch, tables, mask, [])
        with active_step(self.cache, layout):
            output = self.model(
                input_ids=ids[None],
                position_ids=positions[None],
                use_cache=False,
                logits_to_keep=self.logit_rows[:batch],
            )
        return output.logits[0]

    def load_probe(self, batch: int, width: int, generator: Optional[torch.Generator] = None) -> None:
        """Random token ids and positions that read and write only the scratch block (the graphs' self-check)."""
        vocab = self.model.config.get_text_config().vocab_size
        ids = torch.randint(0, vocab, (batch,), generator=generator).tolist()
        positions = torch.randint(0, self.cache.block_size, (batch,), generator=generator).tolist()
        rows = [(token, 0, [SCRATCH_BLOCK]) for token in ids]
        self.load(rows, (batch, width))
        # positions vary (RoPE differs per row); every row still reads and writes the scratch block only
        self.inputs[batch : 2 * batch].copy_(self.uploads.tensor(positions, torch.long))
