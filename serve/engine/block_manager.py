"""Who owns which KV-cache blocks: block tables, reference counts, the prefix cache and its LRU eviction.

The cache is a pool of fixed-size blocks. A sequence holds a list of block ids (its block table) and takes one
more each time it crosses a block boundary. Full blocks are keyed by a digest of (the previous block's key, the
block's tokens, the LoRA adapter), so two requests whose prompts start alike share the blocks of that prefix:
a shared block has a reference count above one and is never written again (only full blocks are shared; a
sequence only ever writes into its own last, partial block).

A block whose count drops to zero keeps its keys and values and its digest: it is *cached*, and a later request
with the same prefix takes it back without recomputing it. Cached blocks are evicted least-recently-freed first,
and only when a fresh block is needed and no never-used block is left. Evicting a block forgets its digest
first, so a stale block is never served.

Block 0 is reserved as scratch: padded rows of a batch write there, and no sequence ever owns it.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from dataclasses import dataclass
from typing import Iterable, Optional

SCRATCH_BLOCK = 0


@dataclass
class PrefixStats:
    """Counters since start: prompt tokens looked up in the prefix cache, and those found there."""

    queried_tokens: int = 0
    hit_tokens: int = 0


def block_key(previous: bytes, tokens: Iterable[int], adapter: Optional[str]) -> bytes:
    """The prefix-cache key of a full block: it names the block's tokens and everything before them."""
    digest = hashlib.blake2b(previous, digest_size=16)
    digest.update(array("q", tokens).tobytes())
    digest.update(b"\0" + (adapter or "").encode())
    return digest.digest()


class BlockManager:
    """Hands out blocks of ``block_size`` tokens from a pool of ``num_blocks`` (block 0 is scratch)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.stats = PrefixStats()
        self._refs = [0] * num_blocks
        self._key_of: list[Optional[bytes]] = [None] * num_blocks
        self._block_of: dict[bytes, int] = {}
        self._pins: dict[str, list[int]] = {}  # a session's conversation: blocks held for its next turn
        self._fresh = collections.deque(range(1, num_blocks))  # never used, or used and forgotten
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # count 0, digest kept; LRU first

    @property
    def usable_blocks(self) -> int:
        """Blocks a sequence can ever hold (all but scratch)."""
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        """Blocks that can be handed out now: never used, or cached and unreferenced (evictable)."""
        return len(self._fresh) + len(self._cached)

    @property
    def used_blocks(self) -> int:
        return self.usable_blocks - self.free_blocks

    def blocks_for(self, tokens: int) -> int:
        """Blocks needed to hold ``tokens`` tokens."""
        return -(-tokens // self.block_size)

    def prefix_keys(self, tokens: list[int], adapter: Optional[str], count: int) -> list[bytes]:
        """Keys of the first ``count`` full blocks of ``tokens``."""
        keys, previous = [], b""
        for index in range(count):
            previous = block_key(previous, tokens[index * self.block_size : (index + 1) * self.block_size], adapter)
            keys.append(previous)
        return keys

    def cached_prefix(self, tokens: list[int], adapter: Optional[str]) -> list[int]:
        """Blocks holding the longest cached prefix of ``tokens``; always leaves the last token to compute."""
        if not self.prefix_caching:
            return []
        found = []
        for key in self.prefix_keys(tokens, adapter, (len(tokens) - 1) // self.block_size):
            block = self._block_of.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def allocate(
        self, tokens: list[int], adapter: Optional[str], reuse: bool, watermark: int = 0
    ) -> Optional[tuple[list[int], int]]:
        """A block table for a new sequence of ``tokens`` and how many of its tokens are already cached.

        None when the blocks it needs (plus ``watermark`` kept free for running sequences) are not free.
        ``reuse=False`` computes every token (a request that scores its prompt needs every position's logits).
        """
        hits = self.cached_prefix(tokens, adapter) if reuse else []
        if self._lacking(hits, len(tokens), watermark) > 0:
            return None
        for block in hits:
            self._take(block)
        table = hits + [self._fresh_block() for _ in range(self.blocks_for(len(tokens)) - len(hits))]
        self.stats.queried_tokens += len(tokens)
        self.stats.hit_tokens += len(hits) * self.block_size
        return table, len(hits) * self.block_size

    def fits_without_pins(self, tokens: list[int], adapter: Optional[str], reuse: bool, watermark: int = 0) -> bool:
        """Whether ``allocate`` would succeed once every session's pins were released."""
        hits = self.cached_prefix(tokens, adapter) if reuse else []
        return self._lacking(hits, len(tokens), watermark) <= self.pin_only_blocks(exclude=set(hits))

    def _lacking(self, hits: list[int], tokens: int, watermark: int) -> int:
        """Blocks missing for a new sequence of ``tokens`` that reuses ``hits`` (0 or less: it fits)."""
        evictable_hits = sum(1 for block in hits if self._refs[block] == 0)
        return self.blocks_for(tokens) - len(hits) + watermark - (self.free_blocks - evictable_hits)

    def append_block(self, table: list[int]) -> bool:
        """Give a growing sequence one more block; False when none is free (the caller preempts someone)."""
        if not self.free_blocks:
            return False
        table.append(self._fresh_block())
        return True

    def shrink(self, table: list[int], keep: int) -> None:
        """Give back a sequence's blocks past its first ``keep`` (a tail that held only rejected proposed tokens)."""
        if len(table) > keep:
            self.free(table[keep:])
            del table[keep:]

    def register_full_blocks(self, table: list[int], tokens: list[int], adapter: Optional[str], known: int) -> int:
        """Key the full blocks of ``table`` past the first ``known`` (their keys and values are now written).

        Returns how many blocks are keyed now. A block whose key another block already holds stays unkeyed.
        """
        full = min(len(tokens) // self.block_size, len(table))
        if not self.prefix_caching or full <= known:
            return max(known, full)
        keys = self.prefix_keys(tokens, adapter, full)
        for index in range(known, full):
            block, key = table[index], keys[index]
            if self._key_of[block] is None and key not in self._block_of:
                self._key_of[block] = key
                self._block_of[key] = block
        return full

    def free(self, table: list[int]) -> None:
        """Drop a sequence's references, last block first: a prompt's head outlives its tail in the LRU order."""
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if self._key_of[block] is None:
                self._fresh.append(block)
            else:
                self._cached[block] = None
        table.clear()

    @property
    def pinned_blocks(self) -> int:
        return sum(len(blocks) for blocks in self._pins.values())

    def pin(self, key: str, blocks: list[int]) -> bool:
        """Hold ``blocks`` (keyed, full) for ``key`` until ``unpin``, replacing what ``key`` held; refused (False)
        when pins would hold more than half the pool. Pins are a cache, not a reservation: the scheduler releases
        them, oldest first, when a sequence needs their blocks (``unpin_oldest``)."""
        held = self._pins.pop(key, [])
        if self.pinned_blocks + len(blocks) > self.usable_blocks // 2:
            self.free(held)
            return False
        for block in blocks:
            self._take(block)
        self._pins[key] = list(blocks)
        self.free(held)
        return True

    def unpin(self, key: str) -> None:
        """Release what ``pin`` held for ``key`` (the blocks stay cached until evicted)."""
        self.free(self._pins.pop(key, []))

    def unpin_oldest(self) -> Optional[str]:
        """Release the pin held longest without a new turn (the least recently pinned); its key, None if none."""
        key = next(iter(self._pins), None)
        if key is not None:
            self.unpin(key)
        return key

    def pin_only_blocks(self, exclude: Iterable[int] = ()) -> int:
        """Blocks that pins alone hold (but those in ``exclude``): unpinning every session would free them."""
        pin_refs = collections.Counter(block for blocks in self._pins.values() for block in blocks)
        skipped = set(exclude)
        return sum(1 for block, refs in pin_refs.items() if refs == self._refs[block] and block not in skipped)

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            self._cached.pop(block, None)
        self._refs[block] += 1

    def _fresh_block(self) -> int:
        """A block with no keys worth keeping: never used, else the least recently freed cached one (forgotten)."""
        if self._fresh:
            block = self._fresh.popleft()
        else:
            block, _ = self._cached.popitem(last=False)
            del self._block_of[self._key_of[block]]
            self._key_of[block] = None
        self._refs[block] = 1
        return block
