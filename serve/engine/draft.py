"""SPECULATIVE=draft: a small model of the target's tokenizer proposes its own greedy tokens.

The draft keeps its own paged KV cache, with the target's block size and number of blocks: each sequence's block
table (the one block manager's ids) indexes both caches, so the draft needs no allocator of its own. For the rows
that propose in a step, one batched forward first catches the draft up on the tokens of each sequence it has not
cached (its prompt at the first proposal, then the tokens accepted since), then ``k - 1`` batched single-token
steps follow; each row's proposal is the draft's argmax at each step. Proposed tokens the target rejects leave
draft keys and values behind; the draft's cached count is cut back to the accepted length (``settle``), so they
are overwritten later. A sequence that stops running (finished, preempted) is forgotten: it starts afresh. A
draft whose forward fails proposes nothing from then on (the log says why); the target decodes on without it.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

from serve.engine.attention import BACKEND_NAME, active_step
from serve.engine.block_manager import SCRATCH_BLOCK
from serve.engine.kv_cache import CacheShape, PagedKVCache
from serve.engine.speculative import Proposer, Reserve
from serve.engine.step_inputs import StepInputs
from serve.engine.uploads import Uploads

log = logging.getLogger(__name__)


class CachedProposer(Proposer):
    """A proposer that runs a model of its own over a paged cache of its own, indexed by the target's block tables
    (the draft model, an EAGLE-3 head): one sequence's proposal goes through the batched path, and a forward that
    fails turns the proposer off (the target decodes on without it)."""

    cache: PagedKVCache
    failure: Optional[str] = None  # why a forward failed, after which it proposes nothing

    @staticmethod
    def own_cache(model: Any, num_blocks: int, block_size: int, dtype: torch.dtype, config: Any) -> PagedKVCache:
        """A cache for ``model`` of the target's ``num_blocks`` blocks of ``block_size``, its decode attention the
        kernel an EngineConfig's ATTENTION_BACKEND picks."""
        from serve.engine.decode_backends import install_decode_backend

        cache = PagedKVCache(draft_shape(model, dtype), num_blocks, block_size, model.device)
        install_decode_backend(cache, config.attention_backend, config.c_compiler)
        return cache

    def propose(self, seq: Any, k: int) -> list[int]:
        room = len(seq.block_table) * self.cache.block_size - seq.num_cached - 1
        return self.propose_rows([(seq, k)], lambda _, count: min(count, room))[0]

    def reset(self) -> None:
        """Forget every sequence (after a failure)."""

    def _guarded(self, work: Callable[[], Any]) -> Any:
        """``work()``; a failure turns the proposer off and gives None (it costs proposals, never a request)."""
        try:
            return work()
        except Exception as exc:  # noqa: BLE001 - a failing proposer costs its proposals, never a request
            self.failure = f"{type(exc).__name__}: {exc}"
            self.reset()
            log.error("the %s proposer failed (%s); no more proposals from it", self.name, self.failure, exc_info=exc)
            return None


class DraftProposer(CachedProposer):
    """Proposes a draft model's greedy tokens, batched over the rows that propose in a step."""

    name = "draft"

    def __init__(self, model: Any, cache: PagedKVCache):
        if not getattr(model, "serve_calls_attend", False):  # lean models call attend() themselves
            if not getattr(model, "_supports_attention_backend", False):
                raise ValueError(f"the draft {type(model).__name__} does not support pluggable attention")
            model.set_attn_implementation(BACKEND_NAME)
        self.model = model
        self.cache = cache
        self.device = model.device
        self.uploads = Uploads(self.device)  # the step inputs' staging buffers (pinned on CUDA)
        self._cached: dict[str, int] = {}  # sequence id -> leading tokens whose draft keys and values are cached

    @classmethod
    def build(cls, model: Any, num_blocks: int, block_size: int, dtype: torch.dtype, config: Any) -> "DraftProposer":
        """The proposer over ``model`` with a cache of the target's blocks (``own_cache``)."""
        return cls(model, cls.own_cache(model, num_blocks, block_size, dtype, config))

    def cached(self, seq: Any) -> int:
        """Leading tokens of ``seq`` whose draft keys and values are in the draft's cache."""
        return min(self._cached.get(seq.id, 0), seq.num_cached)

    def propose_rows(self, rows: list[tuple[Any, int]], reserve: Reserve) -> list[list[int]]:
        if self.failure is not None:
            return [[] for _ in rows]
        counts = [reserve(seq, k) for seq, k in rows]
        active = [(seq, count) for (seq, _), count in zip(rows, counts) if count > 0]
        drafted = self._guarded(lambda: self._draft(active)) if active else []
        if drafted is None:
            return [[] for _ in rows]
        proposals = iter(drafted)
        return [next(proposals) if count > 0 else [] for count in counts]

    def reset(self) -> None:
        self._cached.clear()

    def settle(self, seq: Any) -> None:
        self._cached[seq.id] = self.cached(seq)  # keys and values past the accepted tokens are stale

    def forget(self, seq: Any) -> None:
        self._cached.pop(seq.id, None)

    @torch.inference_mode()
    def _draft(self, rows: list[tuple[Any, int]]) -> list[list[int]]:
        """Each row's ``count`` greedy draft tokens after its last one (one host read for all of them)."""
        widest = max(count for _, count in rows)
        tokens = torch.zeros((len(rows), widest), dtype=torch.long, device=self.device)
        tokens[:, 0] = self._catch_up([seq for seq, _ in rows])
        for step in range(1, widest):
            live = [index for index, (_, count) in enumerate(rows) if count > step]
            chosen = torch.tensor(live, dtype=torch.long, device=self.device)
            positions = [rows[index][0].num_cached + step for index in live]
            inputs = decode_rows([rows[index][0] for index in live], positions, self.cache.block_size)
            tokens[chosen, step] = self._greedy(inputs, tokens[chosen, step - 1])
        for seq, count in rows:
            self._cached[seq.id] = seq.num_cached + count
        return [row[:count] for row, (_, count) in zip(tokens.tolist(), rows)]

    def _catch_up(self, seqs: list[Any]) -> torch.Tensor:
        """Run the draft over each sequence's tokens it has not cached, up to its last one: [rows] the draft's next
        token for each. One token behind is a decode row, more a chunk (decode rows first, as a step lays them)."""
        behind = [(seq, self.cached(seq)) for seq in seqs]
        single = [index for index, (seq, start) in enumerate(behind) if start == seq.num_cached]
        chunked = [index for index, (seq, start) in enumerate(behind) if start < seq.num_cached]
        size = self.cache.block_size
        inputs = decode_rows([seqs[index] for index in single], [seqs[index].num_cached for index in single], size)
        for index in chunked:
            seq, start = behind[index]
            add_chunk(inputs, seq, start, seq.all_ids[start : seq.num_cached + 1], size)
        next_tokens = torch.empty(len(seqs), dtype=torch.long, device=self.device)
        order = torch.tensor(single + chunked, dtype=torch.long, device=self.device)
        next_tokens[order] = self._greedy(inputs)
        return next_tokens

    def _greedy(self, inputs: StepInputs, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The draft's argmax at each kept row of one forward over ``inputs`` (``ids``: the token ids, already on
        the device)."""
        input_ids, positions, layout, logit_rows = inputs.tensors(self.uploads, self.cache.block_size)
        with active_step(self.cache, layout):
            output = self.model(
                input_ids=(input_ids if ids is None else ids)[None],
                position_ids=positions[None],
                use_cache=False,
                logits_to_keep=logit_rows,
            )
        return output.logits[0].argmax(dim=-1)


def decode_rows(seqs: list[Any], positions: list[int], block_size: int) -> StepInputs:
    """Decode rows: each sequence's token at its position (the ids, from the sequences' tokens, may be replaced on
    the device), over its blocks."""
    width = max((len(seq.block_table) for seq in seqs), default=0)
    ids = [seq.all_ids[position] if position < len(seq.all_ids) else 0 for seq, position in zip(seqs, positions)]
    return StepInputs(
        ids,
        list(positions),
        [seq.block_table[p // block_size] * block_size + p % block_size for seq, p in zip(seqs, positions)],
        [seq.block_table + [SCRATCH_BLOCK] * (width - len(seq.block_table)) for seq in seqs],
        [position + 1 for position in positions],
        [],
        list(range(len(seqs))),
    )


def add_chunk(inputs: StepInputs, seq: Any, start: int, tokens: list[int], block_size: int) -> None:
    """Append ``tokens`` at ``seq``'s positions from ``start`` on as a chunk over its blocks; its last row is kept."""
    end = start + len(tokens)
    first = len(inputs.ids)
    inputs.ids.extend(tokens)
    inputs.positions.extend(range(start, end))
    inputs.rows.extend(seq.block_table[p // block_size] * block_size + p % block_size for p in range(start, end))
    inputs.chunks.append((first, len(inputs.ids), start, seq.block_table[: -(-end // block_size)]))
    inputs.logit_rows.append(len(inputs.ids) - 1)


def draft_shape(model: Any, dtype: torch.dtype) -> CacheShape:
    """What one token costs in the draft's cache."""
    return CacheShape.of(model.config, dtype)


def target_share(target: CacheShape, draft: Optional[Any], dtype: torch.dtype) -> float:
    """The share of the KV memory budget the target's cache gets when the draft's cache, of as many tokens, comes
    out of the same budget (1.0 without a draft)."""
    if draft is None:
        return 1.0
    return target.bytes_per_token / (target.bytes_per_token + draft_shape(draft, dtype).bytes_per_token)
