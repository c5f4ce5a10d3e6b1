"""Between routes and engine: encode and check prompts (for the validation step), admit, and collect results."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Generic, Iterable, Iterator, Optional, TypeVar

from serve.config import Settings
from serve.front.disconnect import DisconnectWatcher
from serve.engine import EngineNotReady, EngineOverloaded, Request, RequestStream, SamplingParams, TokenEvent
from serve.engine.engine import AdapterNotLoaded
from serve.engine.grammar import GrammarCheck, GrammarError
from serve.engine.interface import EngineClient
from serve.engine.types import FinishReason, ImageInputs, Limits
from serve.errors import GenerationFailed, NotReady, Overloaded, ShuttingDown, ValidationFailed
from serve.log import log_request
from serve.metrics import Metrics
from serve.front.cache_scope import cache_partition
from serve.front.context import RequestContext
from serve.front.prompt import PromptError, chars_per_token_bound, encode, encode_chat, render_chat

Body = TypeVar("Body")

log = logging.getLogger(__name__)

SHUTTING_DOWN = (
    "the server is shutting down (drain deadline reached); the generation was cut, retry on another instance"
)
DEADLINE_GRACE_S = 1.0  # past the deadline, how long the engine may take to end cut choices before the front does
TRUNCATE_MARGIN_TOKENS = 64  # tokens more than TGI's `truncate` keeps, tokenized so the cut never shows in what is kept


@dataclass(frozen=True)
class ValidRequest(Generic[Body]):
    """A request ready for admission: its parsed body, each prompt's token ids and its resolved engine parameters.

    ``params[p]`` goes with ``prompts[p]`` (max_new_tokens within the limits, grammar compiled); each prompt gets
    ``n`` choices; ``adapter`` is a loaded adapter's name, or None for the base model; ``cache_salt`` is the
    client's prefix-cache salt (serve.front.cache_scope); ``images`` the chat prompt's images."""

    body: Body
    prompts: tuple[list[int], ...]
    params: tuple[SamplingParams, ...]
    n: int = 1
    adapter: Optional[str] = None
    cache_salt: Optional[str] = None
    images: Optional[ImageInputs] = None

    @property
    def prompt_ids(self) -> list[int]:
        """The token ids of the first prompt (the only one but for text completions)."""
        return self.prompts[0]


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

    def __init__(
        self, streams: list[RequestStream], sink: "queue.Queue[tuple[int, TokenEvent]]", context: RequestContext
    ):
        self.streams = streams
        self._sink = sink
        self._open = set(range(len(streams)))
        self.context = context  # the client request these choices answer
        self.recorded = False  # its requests were logged and counted (by stream_events)
        self.cut_at_deadline = False  # set when the invocation deadline stopped the choices still running
        self.deadline_hit = False  # set when a collected answer was cut short at the deadline

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
            if event is None:  # a probe of the client (serve.front.disconnect): write something now, as on a heartbeat
                yield None
                continue
            if event.finish_reason is not None:
                self._open.discard(index)
            yield index, event

    def interrupt(self, reason: str) -> None:
        """End the reading of this generation with a failure (``stream_events`` raises, its cleanup cancels)."""
        if self._open:
            self._sink.put((min(self._open), TokenEvent(None, "", FinishReason.ERROR, error=reason)))

    def end_open(self, generated: dict[int, int]) -> Iterator[tuple[int, TokenEvent]]:
        """End the choices the engine has not ended (frozen or gone) as ``length``, with the tokens read so far."""
        for index in sorted(self._open):
            self._open.discard(index)
            prompt_tokens = len(self.streams[index].request.prompt_ids)
            yield index, TokenEvent(None, "", FinishReason.LENGTH, generated.get(index, 0), prompt_tokens)

    def pending(self) -> bool:
        """Whether events are already waiting to be read (the reader would not block)."""
        return not self._sink.empty()

    def close(self) -> None:
        """Cancel the choices still running (the client went away)."""
        for index in sorted(self._open):
            self.streams[index].close()


class GenerationService:
    """What routes call: prompt checks (for serve.http.routes.validation), then a ValidRequest -> admitted requests ->
    streamed events or collected choices."""

    def __init__(
        self, engine: EngineClient, settings: Settings, metrics: Metrics, watcher: Optional[DisconnectWatcher] = None
    ):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.watcher = watcher  # cancels the requests of clients that hang up
        # compiles within the GRAMMAR_* limits, then dry-runs over the front's own tokenizer's vocabulary
        self.grammar_check = GrammarCheck(settings.grammar_limits, lambda: engine.tokenizer)
        self._chars_per_token: Optional[tuple[Any, int]] = None
        self._live: set[Generation] = set()  # generations being read (stream_events), for the shutdown deadline
        self._live_lock = threading.Lock()

    @property
    def limits(self) -> Limits:
        self._require_ready()
        return self.engine.limits

    @property
    def tokenizer(self) -> Any:
        self._require_ready()
        return self.engine.tokenizer

    def _require_ready(self) -> None:
        """Loaded: a pool whose copies restart or stall still knows its tokenizer and limits (admission says why)."""
        if not self.engine.ready and getattr(self.engine, "recovery_state", None) is None:
            raise NotReady("the model is still loading; retry when /ping answers 200")

    def chat_prompt(
        self,
        messages: Iterable[dict[str, Any]],
        tools: Optional[list[dict[str, Any]]] = None,
        variables: Optional[dict[str, Any]] = None,
    ) -> list[int]:
        """Token ids of the messages (and tool definitions) rendered with the chat template, given the request's
        other template ``variables``; contents stay text."""
        messages = list(messages)
        try:
            text = render_chat(self.tokenizer, messages, tools, self.settings.chat_template, variables)
            self.check_size(text, "messages")
            return encode_chat(self.tokenizer, text, messages, tools, self.settings.chat_template, variables)
        except PromptError as exc:
            raise ValidationFailed(f"messages: {exc}", "messages") from exc

    def text_prompt(self, text: str, truncate: Optional[int] = None, field: str = "prompt") -> list[int]:
        """Token ids of a raw prompt; ``truncate`` keeps only its last tokens (TGI), so only its tail is tokenized."""
        if truncate:
            text = text[-(truncate + TRUNCATE_MARGIN_TOKENS) * self.chars_per_token :]
        else:
            self.check_size(text, field)
        ids = encode(self.tokenizer, text, add_special_tokens=True)
        return ids[-truncate:] if truncate else ids

    @property
    def vocab_size(self) -> int:
        """How many token ids the model scores (its logits' width; may exceed the tokenizer's length)."""
        self._require_ready()
        return int(self.engine.loaded.model.config.get_text_config().vocab_size)

    def check_token_ids(self, token_ids: Iterable[int], field: str) -> None:
        """422 naming ``field`` when a token id is outside the model's vocabulary."""
        outside = sorted({token_id for token_id in token_ids if not 0 <= token_id < self.vocab_size})
        if outside:
            message = f"{field}: token ids {outside[:8]} are outside the vocabulary (0..{self.vocab_size - 1})"
            raise ValidationFailed(message, field)

    def tokenize(self, text: str, field: str = "inputs") -> dict[str, Any]:
        """``/tokenize``: ids and offsets of a text that fits MAX_INPUT_TOKENS (422 otherwise, early if long)."""
        self.check_size(text, field)
        encoding = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        count, limit = len(encoding["input_ids"]), self.limits.max_input_tokens
        if count > limit:
            raise ValidationFailed(f"{field}: the text has {count} tokens, more than MAX_INPUT_TOKENS={limit}", field)
        return encoding

    @property
    def chars_per_token(self) -> int:
        """An upper bound on the characters of one token (computed once per tokenizer)."""
        tokenizer = self.tokenizer
        if self._chars_per_token is None or self._chars_per_token[0] is not tokenizer:
            self._chars_per_token = (tokenizer, chars_per_token_bound(tokenizer))
        return self._chars_per_token[1]

    def check_size(self, text: str, field: str) -> None:
        """422 before any tokenizing when ``text`` is too long to fit MAX_INPUT_TOKENS however it splits."""
        limit, per_token = self.limits.max_input_tokens, self.chars_per_token
        if len(text) > limit * per_token:
            raise ValidationFailed(
                f"{field}: the prompt has {len(text)} characters; MAX_INPUT_TOKENS={limit} tokens hold at most "
                f"{limit * per_token} ({per_token} characters per token at most for this tokenizer)",
                field,
            )

    def check_grammar(self, grammar: Optional[str], field: str) -> None:
        """422 naming ``field`` when a grammar does not compile, or is past a GRAMMAR_* limit."""
        if grammar is None:
            return
        self._require_ready()
        try:
            self.grammar_check.check(grammar)
        except GrammarError as exc:
            raise ValidationFailed(f"{field}: {exc}", field) from None

    def start(self, valid: ValidRequest, context: RequestContext) -> Generation:
        """Admit a validated request: ``n`` choices for each prompt, as one Generation (choice ``p * n + i`` is the
        i-th choice of prompt p); raises a ServeError before any byte is sent when the engine cannot take them.

        The caller releases the Generation once its response is closed (see ``release``)."""
        sink: "queue.Queue[tuple[int, TokenEvent]]" = queue.Queue()
        streams: list[RequestStream] = []
        scope = self.settings.prefix_cache_scope
        partition = cache_partition(scope, valid.cache_salt, valid.adapter, context.session_id)
        try:
            for request in _engine_requests(valid, context.session_id, partition):
                streams.append(self.engine.submit(request, sink=sink, index=len(streams)))
                if self.watcher is not None:
                    self.watcher.watch_client(request.id, context.client, sink)
        except (EngineOverloaded, EngineNotReady, AdapterNotLoaded) as exc:
            for stream in streams:
                stream.close()
            if isinstance(exc, AdapterNotLoaded):  # deleted between the check and the admission
                raise ValidationFailed(f"adapter: {exc} (it was just unregistered)", "adapter") from exc
            raise (Overloaded if isinstance(exc, EngineOverloaded) else NotReady)(str(exc)) from exc
        return Generation(streams, sink, context)

    def release(self, generation: Generation) -> None:
        """Cancel what is still running of ``generation`` once its response is closed, sent or failed.

        A failure after admission (rendering, serialising, a custom ``output_fn``) never reaches ``stream_events``'
        own cleanup; this does, so no choice keeps generating or holds an admission place for a client that left.
        """
        generation.close()
        if not generation.recorded:
            generation.recorded = True
            log.warning(
                "request %s: its response failed or was never sent; its choices were cancelled", generation.request_id
            )
            context = generation.context
            for stream in generation.streams:
                self.record(context.route, stream.request.id, None, context.streamed, "response_failed")

    def collect(self, generation: Generation) -> list[Choice]:
        """Wait for every choice, cut short at the request's deadline; GenerationFailed (424) if the model failed."""
        tokens: dict[int, list[TokenEvent]] = {index: [] for index in range(len(generation.streams))}
        finals: dict[int, TokenEvent] = {}
        for item in self.stream_events(generation, heartbeat=None, deadline=generation.context.deadline):
            if item is None:  # a probe: nothing to write before the response
                continue
            index, event = item
            if event.finish_reason is FinishReason.LENGTH and generation.cut_at_deadline:
                generation.deadline_hit = True
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
        self, generation: Generation, heartbeat: Optional[float], deadline: Optional[float] = None
    ) -> Iterator[Optional[tuple[int, TokenEvent]]]:
        """(index, event) pairs, None every ``heartbeat`` s of silence; GenerationFailed if the model failed.

        With a ``deadline`` (``time.monotonic()``), choices still running then are stopped and end with finish
        reason ``length`` (their text so far). However the iteration ends (finished, failed, or the client left and
        WSGI closed the generator), the choices still running are cancelled, and each engine request is logged and
        counted.
        """
        finals: dict[int, TokenEvent] = {}
        reason = "client_disconnected"
        with self._live_lock:
            self._live.add(generation)
        try:
            for item in _until(generation, heartbeat, deadline):
                if item is not None and item[1].finish_reason is not None:
                    if item[1].error == SHUTTING_DOWN:
                        reason = "shutdown_deadline"
                        raise ShuttingDown(SHUTTING_DOWN)
                    finals[item[0]] = item[1]
                    if item[1].finish_reason is FinishReason.ERROR:
                        raise GenerationFailed(f"generation failed: {item[1].error}")
                    if item[1].finish_reason is FinishReason.CANCELLED:  # cut, so never answered as a "stop"
                        raise GenerationFailed("the generation was cancelled before it finished (its client left)")
                yield item
        finally:
            with self._live_lock:
                self._live.discard(generation)
            generation.close()
            generation.recorded = True
            context = generation.context
            for index, stream in enumerate(generation.streams):
                self.record(context.route, stream.request.id, finals.get(index), context.streamed, reason)

    def interrupt_all(self) -> int:
        """The shutdown deadline: end every generation still being read with an error saying why; how many."""
        with self._live_lock:
            live = list(self._live)
        for generation in live:
            generation.interrupt(SHUTTING_DOWN)
        return len(live)

    def record(
        self,
        route: str,
        request_id: str,
        final: Optional[TokenEvent],
        streamed: bool,
        reason: str = "client_disconnected",
    ) -> None:
        """Log the request's line and count it in the metrics (final is None when it was cut: ``reason`` says why)."""
        log_request(route, request_id, final, streamed, reason)
        if final is not None:
            self.metrics.observe(final)


def _engine_requests(valid: ValidRequest, session_id: Optional[str], partition: Optional[str]) -> Iterator[Request]:
    """The engine requests of ``valid``, in choice order: ``n`` for each prompt, seeds counting up from its seed;
    each tagged with the live session, if any, and the prefix-cache partition."""
    for prompt_ids, base in zip(valid.prompts, valid.params):
        for index in range(valid.n):
            # same seed, same n choices (kept in torch's range)
            seed = None if base.seed is None else (base.seed + index) % 2**64
            params = replace(base, seed=seed)
            session = {"session_id": session_id, "cache_salt": partition, "images": valid.images}
            yield Request(prompt_ids, params, adapter=valid.adapter, **session)


def _until(
    generation: Generation, heartbeat: Optional[float], deadline: Optional[float]
) -> Iterator[Optional[tuple[int, TokenEvent]]]:
    """``generation.events``, but at ``deadline`` the running choices are cancelled and finish as ``length``; those
    the engine has not ended ``DEADLINE_GRACE_S`` later (frozen or gone) are ended here, on the front's clock."""
    if deadline is None:
        yield from generation.events(heartbeat=heartbeat)
        return
    generated: dict[int, int] = {}
    for item in generation.events(heartbeat=0.05):
        if not generation.cut_at_deadline and time.monotonic() >= deadline:
            generation.cut_at_deadline = True
            generation.close()  # each open choice ends with a CANCELLED event within one engine step
        if item is not None:
            index, event = item
            generated[index] = generated.get(index, 0) + (event.token_id is not None)
            if generation.cut_at_deadline and event.finish_reason is FinishReason.CANCELLED:
                event = replace(event, finish_reason=FinishReason.LENGTH)
            yield index, event
        elif heartbeat is not None:
            yield None
        if generation.cut_at_deadline and time.monotonic() >= deadline + DEADLINE_GRACE_S:
            yield from generation.end_open(generated)
            return


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
