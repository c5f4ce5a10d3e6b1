"""The engine: one background thread owns the model and runs continuous batching; HTTP threads submit and read events."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from serve.engine.adapters import AdapterNotLoaded, AdapterTable
from serve.engine.scheduler import EngineOverloaded, Scheduler
from serve.engine.sequence import Sequence
from serve.engine.types import EngineConfig, FinishReason, Request, TokenEvent

log = logging.getLogger(__name__)

__all__ = ["AdapterNotLoaded", "Engine", "EngineNotReady", "EngineOverloaded", "RequestStream"]


class EngineNotReady(RuntimeError):
    """The model has not finished loading, failed to load, or the engine is stopping."""


@dataclass(frozen=True)
class Limits:
    """Token limits in force once the model is loaded."""

    max_input_tokens: int
    max_total_tokens: int
    max_batch_total_tokens: int
    max_batch_size: int


class RequestStream:
    """The events of one request, in order; closing the stream early cancels the request.

    Several streams may share one ``sink`` queue (the n choices of one client request); each puts
    ``(index, event)`` pairs into it, and the reader of the sink tells them apart by index.
    """

    def __init__(self, request: Request, engine: "Engine", sink: Optional[queue.Queue] = None, index: int = 0):
        self.request = request
        self.index = index
        self._engine = engine
        self._events: "queue.Queue[tuple[int, TokenEvent]]" = queue.Queue() if sink is None else sink
        self._finished = False

    def put(self, event: TokenEvent) -> None:
        self._events.put((self.index, event))

    def events(self, heartbeat: Optional[float] = None) -> Iterator[Optional[TokenEvent]]:
        """Yield events until the final one; yield None every ``heartbeat`` seconds of silence."""
        while not self._finished:
            try:
                _, event = self._events.get(timeout=heartbeat)
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
    """Owns the model. ``submit()`` returns a RequestStream; ``cancel()`` drops a request before the next step."""

    def __init__(
        self,
        load: Callable[[], Any],
        config: EngineConfig = EngineConfig(),
        on_load_failure: Optional[Callable[[BaseException], None]] = None,
        on_ready: Optional[Callable[[], None]] = None,
    ):
        self._load = load
        self._on_ready = on_ready
        self.config = config
        self._on_load_failure = on_load_failure
        self.scheduler = Scheduler(config.max_concurrent_requests, config.max_batch_prefill_tokens)
        self._streams: dict[str, RequestStream] = {}
        self._running: list[Sequence] = []
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="engine", daemon=True)
        self.loaded: Any = None
        self.grammars: Any = None  # serve.engine.grammar.Grammars once loaded
        self.limits: Optional[Limits] = None
        self.load_error: Optional[BaseException] = None
        self.adapters = AdapterTable()  # LoRA adapters accepted now, and swaps waiting for the next step

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

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, request: Request, sink: Optional[queue.Queue] = None, index: int = 0) -> RequestStream:
        """Admit a request (EngineOverloaded past the cap, EngineNotReady before load) and return its stream.

        ``sink`` and ``index``: put this request's events, tagged with ``index``, into a queue shared with others.
        """
        if not self.ready:
            raise EngineNotReady("the model is not loaded yet" if self.load_error is None else f"the model failed to load: {self.load_error}")
        stream = RequestStream(request, self, sink, index)
        with self.adapters.admitting(request.adapter):  # AdapterNotLoaded for a deleted adapter
            self._streams[request.id] = stream
            try:
                self.scheduler.admit(request)
            except EngineOverloaded:
                self._streams.pop(request.id, None)
                raise
        return stream

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)

    def close_session(self, session_id: str) -> None:
        """Unpin the session's prefix-cache blocks (its conversation's KV cache), so eviction may reuse them."""

    def _uses_adapter(self, name: str) -> bool:
        """True while an admitted request (waiting or running) uses the adapter."""
        return any(stream.request.adapter == name for stream in list(self._streams.values()))

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _main(self) -> None:
        try:
            self._prepare()
        except BaseException as exc:  # noqa: BLE001 - reported, then the worker decides to exit
            self.load_error = exc
            log.error("model load failed: %s", exc)
            if self._on_load_failure is not None:
                self._on_load_failure(exc)
            return
        self._ready.set()
        log.info("engine ready: %s", self.limits)
        if self._on_ready is not None:
            self._on_ready()
        while not self._stopping.is_set():
            if self.adapters.busy:  # runtime adapter swaps, between steps
                self.adapters.run_pending(getattr(self.loaded.model, "serve_lora", None), self._uses_adapter)
            self._admit_waiting()
            self._drop_cancelled()
            if not self._running:
                self.scheduler.wait_for_work(timeout=0.1)
                continue
            self._step()

    def _prepare(self) -> None:
        """Load the model, size the KV cache, build the runner (torch is imported here, off the HTTP threads)."""
        from serve.engine.grammar import Grammars
        from serve.engine.kv_cache import CacheShape, SlotKVCache, default_cache_bytes, layer_devices, plan_slots
        from serve.engine.runner import ModelRunner

        self.loaded = self._load()
        total = min(self.config.max_total_tokens or min(self.loaded.max_context, 4096), self.loaded.max_context)
        max_input = min(self.config.max_input_tokens or total - 1, total - 1)
        shape = CacheShape.of(self.loaded.model.config, self.loaded.dtype)
        max_slots = min(self.config.max_batch_size or self.config.max_concurrent_requests, self.config.max_concurrent_requests)
        devices = layer_devices(self.loaded.model, shape.layers)  # a model split over GPUs: each layer's cache on its GPU
        slots = plan_slots(shape, total, self.config.max_batch_total_tokens, max_slots, default_cache_bytes(devices))
        self._eos_ids = _eos_token_ids(self.loaded.model, self.loaded.tokenizer)
        self.grammars = Grammars(self.loaded.tokenizer, self.loaded.model.config.get_text_config().vocab_size, self._eos_ids)
        self._runner = ModelRunner(self.loaded.model, SlotKVCache(shape, slots, total, devices), self.grammars)
        self.limits = Limits(max_input, total, slots * total, slots)
        self.adapters.accept(getattr(getattr(self.loaded.model, "serve_lora", None), "names", ()))

    def _admit_waiting(self) -> None:
        """Move waiting requests into free cache slots; one that cannot start fails alone."""
        for request in self.scheduler.pop_waiting(self._runner.cache.free_slots):
            try:
                self._running.append(self._new_sequence(request))
            except Exception as exc:  # noqa: BLE001 - the engine keeps serving the others
                log.exception("request %s could not start", request.id)
                self._streams.pop(request.id).put(
                    TokenEvent(None, "", FinishReason.ERROR, 0, len(request.prompt_ids), error=f"{type(exc).__name__}: {exc}")
                )
                self.scheduler.finish(request.id)

    def _new_sequence(self, request: Request) -> Sequence:
        """A running sequence in a free cache slot, with its RNG and grammar matcher."""
        generator = self._runner.generator_for(request.params)
        matcher = self.grammars.matcher(request.params.grammar)
        slot = self._runner.cache.allocate()
        try:
            return Sequence(request, self.loaded.tokenizer, self._eos_ids, slot, generator, matcher)
        except BaseException:
            self._runner.cache.release(slot)
            raise

    def _drop_cancelled(self) -> None:
        for request in self.scheduler.pop_cancelled_waiting():
            self._streams.pop(request.id).put(TokenEvent(None, "", FinishReason.CANCELLED, 0, len(request.prompt_ids)))
            self.scheduler.finish(request.id)
        for seq in [seq for seq in self._running if self.scheduler.is_cancelled(seq.id)]:
            self._finish(seq, seq.end(FinishReason.CANCELLED))

    def _step(self) -> None:
        """One forward pass for the planned sequences; a failure fails only the sequences of this step."""
        plan = self.scheduler.plan(self._running)
        try:
            sampled, choices = self._runner.step(plan)
            for seq, choice in zip(sampled, choices):
                event = seq.append(choice)
                if event.finish_reason is not None:
                    self._finish(seq, event)
                else:
                    self._streams[seq.id].put(event)
        except Exception as exc:  # noqa: BLE001 - the engine keeps serving the others
            failed = [seq for seq in plan.decode + [seq for seq, _ in plan.prefill] if seq in self._running]
            log.exception("engine step failed; failing its %d requests", len(failed))
            for seq in failed:
                self._finish(seq, seq.end(FinishReason.ERROR, f"{type(exc).__name__}: {exc}"))

    def _finish(self, seq: Sequence, event: TokenEvent) -> None:
        """Send the final event and give back the slot and the admission place."""
        self._running.remove(seq)
        self._runner.cache.release(seq.slot)
        self._streams.pop(seq.id).put(event)
        self.scheduler.finish(seq.id)


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
