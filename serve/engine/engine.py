"""The engine: one background thread owns the model and runs continuous batching; HTTP threads submit and read
events."""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Optional

from serve.engine.adapters import AdapterNotLoaded, AdapterTable
from serve.engine.scheduler import EngineOverloaded, Scheduler
from serve.engine.sequence import Sequence
from serve.engine.stopping import eos_token_ids
from serve.engine.types import EngineConfig, EngineLoad, EngineStats, FinishReason, Limits, Request, TokenEvent

log = logging.getLogger(__name__)

__all__ = ["AdapterNotLoaded", "Engine", "EngineNotReady", "EngineOverloaded", "RequestStream"]


class EngineNotReady(RuntimeError):
    """The model has not finished loading, failed to load, or the engine is stopping."""

    @classmethod
    def because(cls, load_error: Optional[BaseException]) -> "EngineNotReady":
        """Still loading (no error yet), or the reason the load failed."""
        return cls("the model is not loaded yet" if load_error is None else f"the model failed to load: {load_error}")


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
        flush_events: Optional[Callable[[], None]] = None,
    ):
        """``flush_events``: called after each step and before each idle wait, where a sink that batches the
        step's events (serve.engine.process) sends them."""
        self._load = load
        self._on_ready = on_ready
        self._flush_events = flush_events
        self.config = config
        self._on_load_failure = on_load_failure
        self.scheduler = Scheduler(config.max_concurrent_requests, config.max_batch_prefill_tokens)
        self._streams: dict[str, RequestStream] = {}
        self._running: list[Sequence] = []  # in admission order: the last is preempted first
        self._preempted: collections.deque[Sequence] = collections.deque()  # resumed before new requests
        self._preemptions = 0
        self._peak_running = 0
        self._served = 0
        self._steps = 0
        self._busy_seconds = 0.0
        self._closed_sessions: collections.deque[str] = collections.deque()  # from HTTP threads, for the engine
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="engine", daemon=True)
        self.loaded: Any = None
        self.grammars: Any = None  # serve.engine.grammar.Grammars once loaded
        self.eos_ids: Any = None  # the token ids that end a sequence, once loaded
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

    @property
    def waiting(self) -> int:
        """Requests admitted and not running: queued, or preempted and waiting to resume."""
        return self.scheduler.waiting + len(self._preempted)

    @property
    def in_flight(self) -> int:
        return self.scheduler.in_flight

    @property
    def graphs(self) -> Any:
        """What start-up did about CUDA graphs (serve.engine.graphs.GraphReport), once loaded."""
        return self._runner.graphs if self.limits is not None else None

    @property
    def engines(self) -> list["Engine"]:
        return [self]

    @property
    def served(self) -> int:
        """Requests admitted since start."""
        return self._served

    def describe(self) -> list[EngineLoad]:
        compiled = self._runner.compiled if self.limits is not None else None
        return [EngineLoad(self.in_flight, self._served, self.graphs, compiled)]

    def stats(self) -> EngineStats:
        """The KV pool's use and the prefix cache's counters (zeros before the model is loaded)."""
        blocks = getattr(self, "_blocks", None)
        if blocks is None:
            return EngineStats()
        return EngineStats(
            blocks.used_blocks,
            blocks.usable_blocks,
            blocks.stats.queried_tokens,
            blocks.stats.hit_tokens,
            self._preemptions,
            self._peak_running,
            self._steps,
            self._busy_seconds,
        )

    def submit(self, request: Request, sink: Optional[queue.Queue] = None, index: int = 0) -> RequestStream:
        """Admit a request (EngineOverloaded past the cap, EngineNotReady before load) and return its stream.

        ``sink`` and ``index``: put this request's events, tagged with ``index``, into a queue shared with others.
        """
        if not self.ready:
            raise EngineNotReady.because(self.load_error)
        stream = RequestStream(request, self, sink, index)
        with self.adapters.admitting(request.adapter):  # AdapterNotLoaded for a deleted adapter
            self._streams[request.id] = stream
            try:
                self.scheduler.admit(request)
            except EngineOverloaded:
                self._streams.pop(request.id, None)
                raise
        self._served += 1
        return stream

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)

    def close_session(self, session_id: str) -> None:
        """Unpin the session's prefix-cache blocks (its conversation's KV cache), so eviction may reuse them.

        Any thread may call it; the engine thread releases the blocks before its next step."""
        self._closed_sessions.append(session_id)

    def install_adapter(self, name: str, modules: Any) -> Future:
        """Prepare an adapter's weights (read by serve.engine.lora.read_adapter) on the calling thread; the future
        resolves once the engine thread has linked them in, between two steps."""
        from serve.engine.lora import prepare_adapter

        return self.adapters.install(name, prepare_adapter(self.loaded.model, name, modules))

    def retire_adapter(self, name: str) -> Future:
        """Refuse new requests for the adapter now; the future resolves once its last request finished."""
        return self.adapters.retire(name)

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
            while self._closed_sessions:
                self._blocks.unpin(self._closed_sessions.popleft())
            self._admit_waiting()
            self._drop_cancelled()
            if not self._running:
                self._flush()
                self.scheduler.wait_for_work(timeout=0.1)
                continue
            started = time.perf_counter()
            self._step()
            self._steps += 1
            self._busy_seconds += time.perf_counter() - started
            self._flush()

    def _flush(self) -> None:
        if self._flush_events is not None:
            self._flush_events()

    def _prepare(self) -> None:
        """Load the model, size the KV pool, build the runner (torch is imported here, off the HTTP threads)."""
        from serve.engine.block_manager import BlockManager
        from serve.engine.grammar import Grammars
        from serve.engine.kv_cache import CacheShape, PagedKVCache, default_cache_bytes, layer_devices, plan_blocks
        from serve.engine.runner import ModelRunner

        self.loaded = self._load()
        config = self.config
        total = min(config.max_total_tokens or min(self.loaded.max_context, 4096), self.loaded.max_context)
        max_input = min(config.max_input_tokens or total - 1, total - 1)
        shape = CacheShape.of(self.loaded.model.config, self.loaded.dtype)
        devices = layer_devices(
            self.loaded.model, shape.layers
        )  # a model split over GPUs: each layer's cache on its GPU
        size = config.kv_block_size
        blocks = plan_blocks(shape, size, config.max_batch_total_tokens, default_cache_bytes(devices), total + size)
        self._blocks = BlockManager(blocks, size, config.enable_prefix_caching)
        self._watermark = max(1, self._blocks.usable_blocks // 100)  # kept free so running sequences can grow
        self.eos_ids = eos_token_ids(self.loaded.model, self.loaded.tokenizer)
        self.grammars = Grammars(
            self.loaded.tokenizer, self.loaded.model.config.get_text_config().vocab_size, self.eos_ids
        )
        max_batch = min(config.max_batch_size or config.max_concurrent_requests, config.max_concurrent_requests)
        cache = PagedKVCache(shape, blocks, size, devices)
        cpu_threads = getattr(self.loaded, "cpu_threads", None)
        self._runner = ModelRunner(self.loaded.model, cache, self.grammars, max_batch, -(-total // size), cpu_threads)
        if config.compile_cache_dir:  # before the graphs, so that they capture the compiled kernels
            self._runner.compile_layers(config.compile_cache_dir)
        if config.cuda_graphs:
            self._runner.capture_graphs()
        self.limits = Limits(max_input, total, (blocks - 1) * size, max_batch, size, blocks - 1)
        self.adapters.accept(getattr(getattr(self.loaded.model, "serve_lora", None), "names", ()))

    def _admit_waiting(self) -> None:
        """Start preempted sequences, then waiting requests, while their blocks are free; one that cannot start
        fails alone."""
        while len(self._running) < self.limits.max_batch_size:
            if self._preempted:
                if not self._allocate(self._preempted[0], self._preempted[0].prefill_ids):
                    return
                self._running.append(self._preempted.popleft())
            elif not self._start_next_request():
                return
            self._peak_running = max(self._peak_running, len(self._running))

    def _start_next_request(self) -> bool:
        """Admit the oldest waiting request if its prompt's blocks are free; False when it must wait."""
        request = self.scheduler.peek_waiting()
        if request is None:
            return False
        watermark = self._watermark if self._running else 0
        reuse = not request.params.prompt_logprobs  # scoring a prompt needs the logits of all its positions
        allocated = self._blocks.allocate(request.prompt_ids, self._cache_key(request.adapter), reuse, watermark)
        if allocated is None:
            return False
        self.scheduler.pop_waiting(1)
        table, cached = allocated
        try:
            seq = self._new_sequence(request)
        except Exception as exc:  # noqa: BLE001 - the engine keeps serving the others
            self._blocks.free(table)
            log.exception("request %s could not start", request.id)
            error = f"{type(exc).__name__}: {exc}"
            self._streams.pop(request.id).put(TokenEvent.ending(request, FinishReason.ERROR, error))
            self.scheduler.finish(request.id)
            return True
        seq.block_table, seq.num_cached, seq.cached_tokens = table, cached, cached
        self._running.append(seq)
        return True

    def _allocate(self, seq: Sequence, tokens: list[int]) -> bool:
        """Blocks for a preempted sequence to resume (its own earlier blocks may still be in the prefix cache)."""
        key = self._cache_key(seq.request.adapter)
        allocated = self._blocks.allocate(tokens, key, True, self._watermark if self._running else 0)
        if allocated is None:
            return False
        seq.block_table, seq.num_cached = allocated
        return True

    def _new_sequence(self, request: Request) -> Sequence:
        """A running sequence with its RNG and grammar matcher."""
        generator = self._runner.generator_for(request.params)
        matcher = self.grammars.matcher(request.params.grammar)
        return Sequence(request, self.loaded.tokenizer, self.eos_ids, generator, matcher)

    def _grow_decoding(self) -> None:
        """Give each decoding sequence the block its next token needs; when none is free, preempt the most
        recently admitted sequence (its blocks come back) until it fits."""
        size = self._blocks.block_size
        for seq in list(self._running):
            if seq not in self._running or seq.prompt_left or seq.num_cached < len(seq.block_table) * size:
                continue
            while not self._blocks.append_block(seq.block_table):
                victim = self._running[-1]
                self._preempt(victim)
                if victim is seq:
                    break

    def _preempt(self, seq: Sequence) -> None:
        """Take a running sequence's blocks back and queue it to resume first; its client sees no gap."""
        self._running.remove(seq)
        self._blocks.free(seq.block_table)
        self._runner.forget(seq)
        seq.preempt()
        self._preempted.appendleft(seq)
        self._preemptions += 1
        log.info("preempted request %s after %d tokens (KV pool full)", seq.id, len(seq.output_ids))

    def _drop_cancelled(self) -> None:
        for request in self.scheduler.pop_cancelled_waiting():
            self._streams.pop(request.id).put(TokenEvent.ending(request, FinishReason.CANCELLED))
            self.scheduler.finish(request.id)
        for seq in [seq for seq in self._running if self.scheduler.is_cancelled(seq.id)]:
            self._finish(seq, seq.end(FinishReason.CANCELLED))
        for seq in [seq for seq in self._preempted if self.scheduler.is_cancelled(seq.id)]:
            self._preempted.remove(seq)
            self._runner.forget(seq)
            self._streams.pop(seq.id).put(seq.end(FinishReason.CANCELLED))
            self.scheduler.finish(seq.id)

    def _step(self) -> None:
        """One forward pass for the planned sequences; a failure fails only the sequences of this step."""
        self._grow_decoding()
        plan = self.scheduler.plan(self._running)
        try:
            sampled, choices = self._runner.step(plan)
            self._key_full_blocks(plan)
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

    def _cache_key(self, adapter: Optional[str]) -> Optional[str]:
        """What prefix-cache keys name an adapter by: its name and install number (a name deleted and registered
        again from another folder never meets the old one's blocks)."""
        lora = getattr(self.loaded.model, "serve_lora", None)
        return adapter if adapter is None or lora is None else f"{adapter}#{lora.index(adapter)}"

    def _key_full_blocks(self, plan: Any) -> None:
        """Enter the blocks this step filled into the prefix cache (their keys and values are written now)."""
        size = self._blocks.block_size
        for seq in plan.decode + [seq for seq, _ in plan.prefill]:
            if seq.num_cached // size > seq.keyed_blocks:
                tokens = seq.all_ids[: seq.num_cached]
                key = self._cache_key(seq.request.adapter)
                seq.keyed_blocks = self._blocks.register_full_blocks(seq.block_table, tokens, key, seq.keyed_blocks)

    def _finish(self, seq: Sequence, event: TokenEvent) -> None:
        """Send the final event and give back the blocks and the admission place (a session keeps its
        conversation's full blocks pinned for its next turn)."""
        self._running.remove(seq)
        session = seq.request.session_id
        if session is not None and event.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            if not self._blocks.pin(session, seq.block_table[: seq.keyed_blocks]):
                log.info("session %s: not pinned (pinned sessions hold half the KV pool)", session)
        self._blocks.free(seq.block_table)
        self._runner.forget(seq)
        self._streams.pop(seq.id).put(event)
        self.scheduler.finish(seq.id)
