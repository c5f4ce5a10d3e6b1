"""Tensor parallelism for the lean model: which slice of every weight a rank holds, and the two collectives.

Each of N ranks holds 1/N of every layer: q/k/v and gate/up split by output features (column-parallel), o and down
split by input features (row-parallel, one all-reduce each), the embedding and the output head split by vocabulary
rows (the embedding all-reduced, the logits gathered). Attention heads split over the ranks; where a model has fewer
KV heads than ranks, each KV head is held by N / kv_heads ranks. The same slices serve the checkpoint (each rank
reads only its slice of each safetensors tensor) and LoRA adapters (B sliced like a column-parallel weight's rows, A
like a row-parallel weight's columns).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

COLUMN_PARTS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split by output rows
ROW_PARTS = ("o_proj", "down_proj")  # split by input columns; the partial sums are all-reduced
VOCAB_PARTS = ("embed_tokens", "lm_head")  # split by vocabulary rows, padded to a multiple of the ranks


class ShardError(ValueError):
    """The model cannot be split over this many ranks (the message says which dimension does not divide)."""


@dataclass(frozen=True)
class TensorParallel:
    """This process's rank among ``size`` ranks and the torch.distributed group they share (None: the default)."""

    rank: int
    size: int
    group: Any = None

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place."""
        import torch.distributed as dist

        dist.all_reduce(tensor, group=self.group)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` as the group's first rank holds it, on every rank (in place)."""
        import torch.distributed as dist

        source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(tensor, src=source, group=self.group)
        return tensor

    def gather_columns(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's [rows, n] block side by side: [rows, n * size], the same on every rank."""
        import torch.distributed as dist

        blocks = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(blocks, local.contiguous(), group=self.group)
        return torch.cat(blocks, dim=-1)


def shard_sizes(config: Any, most: int) -> tuple[int, ...]:
    """The rank counts up to ``most`` whose shares of ``config`` divide evenly (``ShardLayout.of`` accepts)."""
    sizes = []
    for size in range(1, most + 1):
        try:
            ShardLayout.of(config, 0, size)
        except ShardError:
            continue
        sizes.append(size)
    return tuple(sizes)


def _split(total: int, size: int, what: str) -> int:
    if total % size:
        raise ShardError(f"{what} ({total}) do not divide over {size} ranks")
    return total // size


@dataclass(frozen=True)
class ShardLayout:
    """The slices rank ``rank`` of ``size`` holds, from the model's config."""

    rank: int
    size: int
    heads: int  # query heads on this rank
    kv_heads: int  # KV heads on this rank (1 where KV heads are replicated)
    kv_start: int  # the first KV head this rank holds
    head_dim: int
    intermediate: int  # MLP features on this rank
    vocab: int  # the model's vocabulary
    vocab_rows: int  # vocabulary rows on this rank (the last rank's tail padded with zero rows)

    @classmethod
    def of(cls, config: Any, rank: int, size: int) -> "ShardLayout":
        """Rank ``rank``'s share of ``config``; ShardError when a dimension does not split over ``size`` ranks."""
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        local_heads = _split(heads, size, "attention heads")
        if kv_heads >= size:
            local_kv = _split(kv_heads, size, "KV heads")
            kv_start = rank * local_kv
        elif size % kv_heads:
            raise ShardError(f"{kv_heads} KV heads cannot be replicated evenly over {size} ranks")
        else:  # each KV head serves size / kv_heads ranks: the one this rank's query heads read
            local_kv, kv_start = 1, rank // (size // kv_heads)
        return cls(
            rank,
            size,
            local_heads,
            local_kv,
            kv_start,
            getattr(config, "head_dim", None) or config.hidden_size // heads,
            _split(config.intermediate_size, size, "MLP features"),
            config.vocab_size,
            -(-config.vocab_size // size),
        )

    def vocab_range(self) -> tuple[int, int]:
        """[start, end) of the vocabulary rows this rank holds (end clipped to the vocabulary)."""
        start = self.rank * self.vocab_rows
        return start, min(start + self.vocab_rows, self.vocab)

    def rows_of(self, part: str) -> Optional[slice]:
        """Output rows of checkpoint projection ``part`` this rank holds (None: all of them)."""
        dim = self.head_dim
        if part == "q_proj":
            return slice(self.rank * self.heads * dim, (self.rank + 1) * self.heads * dim)
        if part in ("k_proj", "v_proj"):
            return slice(self.kv_start * dim, (self.kv_start + self.kv_heads) * dim)
        if part in ("gate_proj", "up_proj"):
            return slice(self.rank * self.intermediate, (self.rank + 1) * self.intermediate)
        if part in VOCAB_PARTS:
            return slice(*self.vocab_range())
        return None

    def columns_of(self, part: str) -> Optional[slice]:
        """Input columns of row-parallel projection ``part`` this rank holds (None: all of them)."""
        if part == "o_proj":
            return slice(self.rank * self.heads * self.head_dim, (self.rank + 1) * self.heads * self.head_dim)
        if part == "down_proj":
            return slice(self.rank * self.intermediate, (self.rank + 1) * self.intermediate)
        return None

    def take(self, name: str, tensor: Any) -> torch.Tensor:
        """This rank's slice of checkpoint tensor ``name`` from ``tensor``: a torch tensor, or a safetensors slice
        (indexing one reads only the rows asked for). A row-parallel bias is added once: rank 0 keeps it, the
        others hold zeros."""
        part, attribute = name.split(".")[-2:]
        rows, columns = self.rows_of(part), self.columns_of(part)
        if rows is not None:
            return tensor[rows]
        if columns is None:
            return tensor[:]
        if attribute != "bias":
            return tensor[:, columns]
        whole = tensor[:]
        return whole if self.rank == 0 else torch.zeros_like(whole)

    def adapter(self, path: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of a LoRA pair on projection ``path``: B's rows of a column-parallel projection, A's
        columns of a row-parallel one (whose partial delta joins the layer's all-reduce)."""
        part = path.rpartition(".")[2]
        rows, columns = self.rows_of(part), self.columns_of(part)
        if rows is not None:
            return a, b[rows]
        if columns is not None:
            return a[:, columns], b
        return a, b
