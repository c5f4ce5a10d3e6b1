"""One request's state inside the engine: its tokens, its KV blocks, its text so far, and when it is finished."""

from __future__ import annotations

import time
from typing import Any, Optional

from serve.engine.detokenize import IncrementalDetokenizer
from serve.engine.grammar import grammar_failure
from serve.engine.stopping import StopStringMatcher
from serve.engine.types import FinishReason, Request, Timings, TokenChoice, TokenEvent


class Sequence:
    """Tracks one running request: cache progress, generated tokens, and the TokenEvent for each new token."""

    def __init__(
        self, request: Request, tokenizer: Any, eos_ids: frozenset[int], generator: Any = None, matcher: Any = None
    ):
        self.request = request
        self.block_table: list[int] = []  # KV blocks holding this sequence's tokens, in order
        self.keyed_blocks = 0  # leading full blocks registered in the prefix cache
        self.cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.prefill_ids: list[int] = request.prompt_ids  # what prefill computes: the prompt, or all after preemption
        self.preemptions = 0
        self.started_step = 0  # the scheduler's step at which it last started or resumed running
        self.generator = generator
        self.matcher = matcher  # the llguidance matcher of a grammar-constrained request
        self.prompt_logprobs: list[Optional[float]] = [None]  # the first prompt token has no prediction
        self.prompt_top_logprobs: list[tuple[tuple[int, float], ...]] = [()]  # the params.logprobs likeliest at each
        self.output_ids: list[int] = []
        self.proposal: list[int] = []  # tokens proposed to follow the last one, verified in this step
        self.images: Any = None  # serve.engine.multimodal.PromptImages: the prompt's encoded images, if any
        self.num_cached = 0  # tokens whose keys/values are in the cache
        self.pending_tokens = 0  # tokens sampled by a launched step that the host has not read yet (ahead.py)
        self.eos_ids = frozenset() if request.params.ignore_eos else eos_ids
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self.stops = StopStringMatcher(request.params.stop)
        self.finish_reason: Optional[FinishReason] = None
        self.admitted_at = time.monotonic()
        self.first_token_at: Optional[float] = None

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def all_ids(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not yet in the cache (0 once prefill is done)."""
        return max(len(self.prefill_ids) - self.num_cached, 0)

    @property
    def ends_with_pending(self) -> bool:
        """Whether the tokens still on the device reach ``max_new_tokens``: no step after them is needed."""
        if not self.pending_tokens:
            return False
        return len(self.output_ids) + self.pending_tokens >= self.request.params.max_new_tokens

    @property
    def scores_prompt(self) -> bool:
        """Whether prefill must keep every prompt position's logits (TGI decoder_input_details, echo scoring)."""
        return self.request.params.prompt_logprobs and not self.preemptions

    def preempt(self) -> None:
        """Forget the cache (its blocks were taken back): prefill recomputes the prompt and the tokens made so far.

        The last sampled token is recomputed too, and the next token sampled from its logits, exactly as the
        decode step would have; text, stop matching, grammar state and the RNG carry on untouched.
        """
        self.prefill_ids = self.all_ids
        self.num_cached = 0
        self.keyed_blocks = 0
        self.preemptions += 1

    def append(self, choice: TokenChoice) -> TokenEvent:
        """Record one sampled token; the returned event is final when the sequence just finished."""
        if choice.error is not None:
            return self.end(FinishReason.ERROR, choice.error)
        if self.request.params.max_new_tokens == 0:
            return self._scored_only()
        token_id = choice.token_id
        first = self.first_token_at is None
        if first:
            self.first_token_at = time.monotonic()
        self.output_ids.append(token_id)
        if self.matcher is not None:
            self.matcher.consume_token(token_id)
            if self.matcher.is_error():  # a lexer step past the GRAMMAR_* limits: this request ends, named
                return self.end(FinishReason.ERROR, grammar_failure(self.matcher))
        if token_id in self.eos_ids:
            self.finish_reason = FinishReason.STOP
            return self._event(choice, self._drain(), first)
        text = self.stops.feed(self.detokenizer.push(token_id))
        grammar_done = self.matcher is not None and self.matcher.is_stopped()  # nothing but EOS could follow
        if self.stops.matched is None and grammar_done:
            self.finish_reason = FinishReason.STOP
            text += self._drain()
        elif self.stops.matched is None and len(self.output_ids) >= self.request.params.max_new_tokens:
            self.finish_reason = FinishReason.LENGTH
            text += self._drain()
        if self.stops.matched is not None:
            self.finish_reason = FinishReason.STOP
        return self._event(choice, text, first)

    def _scored_only(self) -> TokenEvent:
        """A scoring request (max_new_tokens 0) ends after prefill, without a token: one event, with prompt scores."""
        self.first_token_at = time.monotonic()
        self.finish_reason = FinishReason.LENGTH
        return self._event(TokenChoice(None), "", first=True)

    def end(self, reason: FinishReason, error: Optional[str] = None) -> TokenEvent:
        """The final event of a sequence stopped from outside (cancelled, or the model failed)."""
        self.finish_reason = reason
        return TokenEvent(
            None,
            "",
            reason,
            len(self.output_ids),
            len(self.request.prompt_ids),
            self.timings(),
            error,
            cached_tokens=self.cached_tokens,
        )

    def timings(self) -> Timings:
        now = time.monotonic()
        first = self.first_token_at or now
        return Timings(self.admitted_at - self.request.arrival, first - self.admitted_at, now - first)

    def _drain(self) -> str:
        """Text still held back by the detokenizer or the stop matcher, at the end."""
        text = self.stops.feed(self.detokenizer.flush())
        return text if self.stops.matched is not None else text + self.stops.flush()

    def _event(self, choice: TokenChoice, text: str, first: bool) -> TokenEvent:
        wants_prompt = first and self.request.params.prompt_logprobs
        return TokenEvent(
            token_id=choice.token_id,
            text=text,
            finish_reason=self.finish_reason,
            generated_tokens=len(self.output_ids),
            prompt_tokens=len(self.request.prompt_ids),
            timings=self.timings() if self.finish_reason is not None else None,
            stop_sequence=self.stops.matched,
            logprob=choice.logprob,
            top_logprobs=choice.top_logprobs,
            prompt_logprobs=tuple(self.prompt_logprobs) if wants_prompt else None,
            cached_tokens=self.cached_tokens,
            prompt_top_logprobs=tuple(self.prompt_top_logprobs) if wants_prompt else None,
        )
