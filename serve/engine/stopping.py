"""When a sequence stops: its end-of-sequence ids, and stop strings matched on decoded text even when they span
token boundaries."""

from __future__ import annotations

from typing import Any, Optional


class StopStringMatcher:
    """Holds back text that could still become a stop string; cuts the output at the first match."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(stop for stop in stops if stop)
        self.longest = max((len(stop) for stop in self.stops), default=0)
        self.pending = ""
        self.matched: Optional[str] = None

    def feed(self, text: str) -> str:
        """Add new text; return the part that is safe to emit now."""
        if not self.stops:
            return text
        self.pending += text
        cut = self._first_match()
        if cut is not None:
            emit, self.pending = self.pending[:cut], ""
            return emit
        keep = self._partial_suffix_length()
        emit, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return emit

    def flush(self) -> str:
        """The held-back text, at the end of generation when no stop string can complete any more."""
        emit, self.pending = self.pending, ""
        return emit

    def _first_match(self) -> Optional[int]:
        best: Optional[int] = None
        for stop in self.stops:
            index = self.pending.find(stop)
            if index != -1 and (best is None or index < best):
                best, self.matched = index, stop
        return best

    def _partial_suffix_length(self) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of some stop string."""
        for size in range(min(self.longest - 1, len(self.pending)), 0, -1):
            tail = self.pending[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids from the generation config (int or list) and the tokenizer."""
    ids: set[int] = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(int(token) for token in config_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)
