"""One request's state inside the engine: its tokens, its text so far, and when it is finished."""

from __future__ import annotations

from typing import Any, Optional

from serve.engine.detokenize import IncrementalDetokenizer
from serve.engine.stopping import StopStringMatcher
from serve.engine.types import FinishReason, Request, TokenEvent


class Sequence:
    """Tracks generated tokens and turns each into a TokenEvent (text delta, finish reason)."""

    def __init__(self, request: Request, tokenizer: Any, eos_ids: frozenset[int]):
        self.request = request
        self.output_ids: list[int] = []
        self.eos_ids = frozenset() if request.params.ignore_eos else eos_ids
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self.stops = StopStringMatcher(request.params.stop)
        self.finish_reason: Optional[FinishReason] = None

    @property
    def all_ids(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    def append(self, token_id: int) -> TokenEvent:
        """Record one sampled token; the returned event is final when the sequence just finished."""
        self.output_ids.append(token_id)
        if token_id in self.eos_ids:
            self.finish_reason = FinishReason.STOP
            return self._event(token_id, self._drain())
        text = self.stops.feed(self.detokenizer.push(token_id))
        if self.stops.matched is None and len(self.output_ids) >= self.request.params.max_new_tokens:
            self.finish_reason = FinishReason.LENGTH
            text += self._drain()
        if self.stops.matched is not None:
            self.finish_reason = FinishReason.STOP
        return self._event(token_id, text)

    def _drain(self) -> str:
        """Text still held back by the detokenizer or the stop matcher, at the end."""
        text = self.stops.feed(self.detokenizer.flush())
        return text if self.stops.matched is not None else text + self.stops.flush()

    def _event(self, token_id: int, text: str) -> TokenEvent:
        return TokenEvent(
            token_id=token_id,
            text=text,
            finish_reason=self.finish_reason,
            generated_tokens=len(self.output_ids),
            prompt_tokens=len(self.request.prompt_ids),
            stop_sequence=self.stops.matched,
        )
