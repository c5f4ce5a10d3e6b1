"""The engine: one background thread loads the model and generates; HTTP threads submit and read events."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Iterator, Optional

from serve.engine.scheduler import EngineOverloaded, Scheduler
from serve.engine.sequence import Sequence
from serve.engine.types import FinishReason, Request, Timings, TokenEvent

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineNotReady", "EngineOverloaded", "RequestStream"]


class EngineNotReady(RuntimeError):
    """The model has not finished loading, failed to load, or the engine is stopping."""


class RequestStream:
    """The events of one request, in order; closing the stream early cancels the request."""

    def __init__(self, request: Request, engine: "Engine"):
        self.request = request
        self._engine = engine
        self._events: "queue.Queue[TokenEvent]" = queue.Queue()
        self._finished = False

    def put(self, event: TokenEvent) -> None:
        self._events.put(event)

    def events(self, heartbeat: Optional[float] = None) -> Iterator[Optional[TokenEvent]]:
        """Yield events until the final one; yield None every ``heartbeat`` seconds of silence."""
        while not self._finished:
            try:
                event = self._events.get(timeout=heartbeat)
            except queue.Empty:
                yield None
                continue
            self._finished = event.finish_reason is not None
            yield event

    def __iter__(self) -> Iterator[TokenEvent]:
        return (event for event in self.events() if event is not None)

    def close(self) -> None:
        """Cancel the request if it has not finished (the client went away)."""
        if not self._finished:
            self._engine.cancel(self.request.id)


class Engine:
    """Owns the model. ``submit()`` returns a RequestStream; ``cancel()`` stops a request at its next step."""

    def __init__(
        self,
        load: Callable[[], Any],
        max_concurrent_requests: int = 128,
        on_load_failure: Optional[Callable[[BaseException], None]] = None,
    ):
        self._load = load
        self._on_load_failure = on_load_failure
        self.scheduler = Scheduler(max_concurrent_requests)
        self._streams: dict[str, RequestStream] = {}
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="engine", daemon=True)
        self.loaded: Any = None
        self.load_error: Optional[BaseException] = None
        self.running = 0

    def start(self) -> "Engine":
        """Start loading and serving in the background (idempotent)."""
        if not self._thread.is_alive() and not self._ready.is_set() and self.load_error is None:
            self._thread.start()
        return self

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping.is_set()

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def submit(self, request: Request) -> RequestStream:
        """Admit a request (EngineOverloaded past the cap, EngineNotReady before load) and return its stream."""
        if not self.ready:
            raise EngineNotReady("the model is not loaded yet" if self.load_error is None else f"the model failed to load: {self.load_error}")
        stream = RequestStream(request, self)
        self._streams[request.id] = stream
        try:
            self.scheduler.admit(request)
        except EngineOverloaded:
            self._streams.pop(request.id, None)
            raise
        return stream

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _main(self) -> None:
        try:
            from serve.engine.runner import ModelRunner  # torch is imported here, off the HTTP threads

            self.loaded = self._load()
            self._runner = ModelRunner(self.loaded.model)
            self._eos_ids = _eos_token_ids(self.loaded.model, self.loaded.tokenizer)
        except BaseException as exc:  # noqa: BLE001 - reported, then the worker decides to exit
            self.load_error = exc
            log.error("model load failed: %s", exc)
            if self._on_load_failure is not None:
                self._on_load_failure(exc)
            return
        self._ready.set()
        log.info("engine ready")
        while not self._stopping.is_set():
            request = self.scheduler.next_request(timeout=0.1)
            if request is not None:
                self._serve(request)

    def _serve(self, request: Request) -> None:
        stream = self._streams.pop(request.id)
        try:
            self.running = 1
            self._generate(request, stream)
        except Exception as exc:  # noqa: BLE001 - a failing forward fails this request, not the engine
            log.exception("generation failed for request %s", request.id)
            stream.put(TokenEvent(None, "", FinishReason.ERROR, prompt_tokens=len(request.prompt_ids), error=f"{type(exc).__name__}: {exc}"))
        finally:
            self.running = 0
            self.scheduler.finish(request.id)

    def _generate(self, request: Request, stream: RequestStream) -> None:
        started = time.monotonic()
        sequence = Sequence(request, self.loaded.tokenizer, self._eos_ids)
        generator = self._runner.generator_for(request.params)
        if self.scheduler.is_cancelled(request.id):
            stream.put(self._cancelled(sequence, Timings(started - request.arrival, 0.0, 0.0)))
            return
        logits, cache = self._runner.prefill(request.prompt_ids)
        prefilled = time.monotonic()
        while True:
            token = self._runner.sample(logits, [sequence], [generator])[0]
            event = sequence.append(token)
            if event.finish_reason is not None:
                timings = Timings(started - request.arrival, prefilled - started, time.monotonic() - prefilled)
                stream.put(_with_timings(event, timings))
                return
            stream.put(event)
            if self.scheduler.is_cancelled(request.id):
                stream.put(self._cancelled(sequence, Timings(started - request.arrival, prefilled - started, time.monotonic() - prefilled)))
                return
            logits, cache = self._runner.decode(token, cache)

    @staticmethod
    def _cancelled(sequence: Sequence, timings: Timings) -> TokenEvent:
        return TokenEvent(None, "", FinishReason.CANCELLED, len(sequence.output_ids), len(sequence.request.prompt_ids), timings)


def _with_timings(event: TokenEvent, timings: Timings) -> TokenEvent:
    return replace(event, timings=timings)


def _eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
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
