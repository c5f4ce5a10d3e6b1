"""Between routes and engine: encode prompts, check token limits, admit, and collect results."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Optional

from serve.config import Settings
from serve.engine import Engine, EngineNotReady, EngineOverloaded, Request, RequestStream, SamplingParams, TokenEvent
from serve.engine.engine import AdapterNotLoaded, Limits
from serve.engine.grammar import GrammarError
from serve.engine.types import FinishReason
from serve.errors import GenerationFailed, NotReady, Overloaded, ValidationFailed
from serve.invocation import current as current_invocation
from serve.log import log_request
from serve.metrics import Metrics
from serve.model.prompt import PromptError, encode, render_chat


@dataclass
class Choice:
    """One finished choice of a request: its text, its token events (for log-probabilities) and its final event."""

    index: int
    text: str
    tokens: list[TokenEvent]
    final: TokenEvent
    seed: Optional[int] = None


class Generation:
    """The engine requests behind one client request (``n`` choices), read as one stream of (index, event)."""

    def __init__(self, streams: list[RequestStream], sink: "queue.Queue[tuple[int, TokenEvent]]"):
        self.streams = streams
        self._sink = sink
        self._open = set(range(len(streams)))
        self.cut_at_deadline = False  # set when the invocation deadline stopped the choices still running

    @property
    def request_id(self) -> str:
        return self.streams[0].request.id

    def events(self, heartbeat: Optional[float] = None) -> Iterator[Optional[tuple[int, TokenEvent]]]:
        """(index, event) pairs until every choice has finished; None every ``heartbeat`` s of silence."""
        while self._open:
            try:
                index, event = self._sink.get(timeout=heartbeat)
            except queue.Empty:
                yield None
                continue
            if event.finish_reason is not None:
                self._open.discard(index)
            yield index, event

    def close(self) -> None:
        """Cancel the choices still running (the client went away)."""
        for index in sorted(self._open):
            self.streams[index].close()


class GenerationService:
    """What routes call: prompt -> admitted requests -> streamed events or collected choices."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics

    @property
    def limits(self) -> Limits:
        self._require_ready()
        return self.engine.limits

    @property
    def tokenizer(self) -> Any:
        self._require_ready()
        return self.engine.tokenizer

    def _require_ready(self) -> None:
        if not self.engine.ready:
            raise NotReady("the model is still loading; retry when /ping answers 200")

    def chat_prompt(self, messages: Iterable[dict[str, Any]], tools: Optional[list[dict[str, Any]]] = None) -> list[int]:
        """Token ids of the messages (and tool definitions) rendered with the chat template."""
        try:
            text = render_chat(self.tokenizer, list(messages), tools, self.settings.chat_template)
        except PromptError as exc:
            raise ValidationFailed(f"messages: {exc}", "messages") from exc
        return encode(self.tokenizer, text, add_special_tokens=False)

    def text_prompt(self, text: str, truncate: Optional[int] = None) -> list[int]:
        """Token ids of a raw prompt; ``truncate`` keeps only its last tokens (TGI)."""
        ids = encode(self.tokenizer, text, add_special_tokens=True)
        return ids[-truncate:] if truncate else ids

    def check_grammar(self, grammar: Optional[str], field: str) -> None:
        """422 naming ``field`` when a grammar does not compile for this model's vocabulary."""
        if grammar is None:
            return
        self._require_ready()
        try:
            self.engine.grammars.check(grammar)
        except GrammarError as exc:
            raise ValidationFailed(f"{field}: {exc}", field) from None

    def start(
        self,
        prompt_ids: list[int],
        requested_max_tokens: Optional[int],
        to_params: Callable[[int], SamplingParams],
        prompt_field: str,
        n: int = 1,
        adapter: Optional[str] = None,
    ) -> Generation:
        """Check the limits, then admit ``n`` choices; raises a 4xx/5xx ServeError before any byte is sent."""
        max_new_tokens = self._max_new_tokens(len(prompt_ids), requested_max_tokens, prompt_field)
        params = to_params(max_new_tokens)
        sink: "queue.Queue[tuple[int, TokenEvent]]" = queue.Queue()
        streams: list[RequestStream] = []
        context = current_invocation()
        session_id = context.session_id if context is not None else None
        try:
            for index in range(n):
                seed = None if params.seed is None else (params.seed + index) % 2**64  # same seed, same n choices (kept in torch's range)
                request = Request(
                    prompt_ids=prompt_ids, params=replace(params, seed=seed), adapter=adapter, session_id=session_id
                )
                streams.append(self.engine.submit(request, sink=sink, index=index))
        except (EngineOverloaded, EngineNotReady, AdapterNotLoaded) as exc:
            for stream in streams:
                stream.close()
            if isinstance(exc, AdapterNotLoaded):  # deleted between the check and the admission
                raise ValidationFailed(f"adapter: {exc} (it was just unregistered)", "adapter") from exc
            raise (Overloaded if isinstance(exc, EngineOverloaded) else NotReady)(str(exc)) from exc
        return Generation(streams, sink)

    def _max_new_tokens(self, prompt_tokens: int, requested: Optional[int], prompt_field: str) -> int:
        limits = self.limits
        if prompt_tokens == 0:
            raise ValidationFailed(f"{prompt_field}: the prompt is empty", prompt_field)
        if prompt_tokens > limits.max_input_tokens:
            raise ValidationFailed(
                f"{prompt_field}: the prompt has {prompt_tokens} tokens, more than MAX_INPUT_TOKENS="
                f"{limits.max_input_tokens}",
                prompt_field,
            )
        room = limits.max_total_tokens - prompt_tokens
        if requested is not None and requested > room:
            raise ValidationFailed(
                f"max_tokens: {requested} new tokens plus the {prompt_tokens} prompt tokens exceed "
                f"MAX_TOTAL_TOKENS={limits.max_total_tokens}; ask for at most {room}",
                "max_tokens",
            )
        return min(room, self.settings.default_max_new_tokens) if requested is None else requested

    def collect(self, generation: Generation, route: str) -> list[Choice]:
        """Wait for every choice; GenerationFailed (424) if the model failed."""
        tokens: dict[int, list[TokenEvent]] = {index: [] for index in range(len(generation.streams))}
        finals: dict[int, TokenEvent] = {}
        context = current_invocation()
        deadline = context.deadline if context is not None else None
        events = self.stream_events(generation, route, heartbeat=None, deadline=deadline)
        for index, event in events:  # type: ignore[misc]
            if event.finish_reason is FinishReason.LENGTH and generation.cut_at_deadline and context is not None:
                context.deadline_hit = True
            tokens[index].append(event)
            if event.finish_reason is not None:
                finals[index] = event
        return [
            Choice(
                index,
                "".join(event.text for event in events),
                [event for event in events if event.token_id is not None],
                finals[index],
                generation.streams[index].request.params.seed,
            )
            for index, events in tokens.items()
        ]

    def stream_events(
        self, generation: Generation, route: str, heartbeat: Optional[float], deadline: Optional[float] = None
    ) -> Iterator[Optional[tuple[int, TokenEvent]]]:
        """(index, event) pairs, None every ``heartbeat`` s of silence; GenerationFailed if the model failed.

        With a ``deadline`` (``time.monotonic()``), choices still running then are stopped and end with finish
        reason ``length`` (their text so far). However the iteration ends (finished, failed, or the client left and
        WSGI closed the generator), the choices still running are cancelled, and each engine request is logged and
        counted.
        """
        finals: dict[int, TokenEvent] = {}
        try:
            for item in _until(generation, heartbeat, deadline):
                if item is not None and item[1].finish_reason is not None:
                    finals[item[0]] = item[1]
                    if item[1].finish_reason is FinishReason.ERROR:
                        raise GenerationFailed(f"generation failed: {item[1].error}")
                yield item
        finally:
            generation.close()
            for index, stream in enumerate(generation.streams):
                self.record(route, stream.request.id, finals.get(index), streamed=heartbeat is not None)

    def record(self, route: str, request_id: str, final: Optional[TokenEvent], streamed: bool) -> None:
        """Log the request's line and count it in the metrics (final is None when the client left mid-stream)."""
        log_request(route, request_id, final, streamed)
        if final is not None:
            self.metrics.observe(final)


def _until(
    generation: Generation, heartbeat: Optional[float], deadline: Optional[float]
) -> Iterator[Optional[tuple[int, TokenEvent]]]:
    """``generation.events``, but at ``deadline`` the running choices are cancelled and finish as ``length``."""
    if deadline is None:
        yield from generation.events(heartbeat=heartbeat)
        return
    for item in generation.events(heartbeat=0.05):
        if not generation.cut_at_deadline and time.monotonic() >= deadline:
            generation.cut_at_deadline = True
            generation.close()  # each open choice ends with a CANCELLED event within one engine step
        if item is None:
            if heartbeat is not None:
                yield None
            continue
        index, event = item
        if generation.cut_at_deadline and event.finish_reason is FinishReason.CANCELLED:
            event = replace(event, finish_reason=FinishReason.LENGTH)
        yield index, event


def timing_headers(final: TokenEvent) -> dict[str, str]:
    """TGI's response headers with the request's timings (milliseconds) and token counts."""
    if final.timings is None:
        return {}
    per_token = final.timings.decode / max(final.generated_tokens - 1, 1)
    return {
        "x-compute-time": f"{(final.timings.prefill + final.timings.decode) * 1000:.0f}",
        "x-queue-time": f"{final.timings.queue * 1000:.0f}",
        "x-prompt-tokens": str(final.prompt_tokens),
        "x-generated-tokens": str(final.generated_tokens),
        "x-time-per-token": f"{per_token * 1000:.0f}",
    }
