"""The engine: one background thread owns the model and runs continuous batching; HTTP threads submit and read
events."""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Optional

from serve.engine.adapters import AdapterNotLoaded, AdapterTable
from serve.engine.ahead import AheadReport, works_ahead
from serve.engine.scheduler import Event, Scheduler
from serve.engine.sequence import Sequence
from serve.engine.stopping import eos_token_ids
from serve.engine.stream import RequestStream
from serve.engine.types import EngineConfig, EngineLoad, EngineStats, Limits, Request, prefill_token_budget
from serve.engine.types import total_token_limit

log = logging.getLogger(__name__)

__all__ = ["AdapterNotLoaded", "Engine", "EngineNotReady"]


class EngineNotReady(RuntimeError):
    """The model has not finished loading, failed to load, or the engine is stopping."""

    @classmethod
    def because(cls, load_error: Optional[BaseException]) -> "EngineNotReady":
        """Still loading (no error yet), or the reason the load failed."""
        return cls("the model is not loaded yet" if load_error is None else f"the model failed to load: {load_error}")


class Engine:
    """Owns the model. ``submit()`` returns a RequestStream; ``cancel()`` drops a request before the next step.

    The engine thread's step is ``scheduler.schedule()``, ``runner.step(plan)``, ``scheduler.postprocess()``; the
    engine delivers the events they return to the requests' streams. Working ahead (ASYNC_SCHEDULING,
    serve/engine/ahead.py), it launches the next plan before it collects the last one.
    """

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
        self.scheduler: Optional[Scheduler] = None  # once loaded: it sizes the KV pool
        self._streams: dict[str, RequestStream] = {}
        self._served = 0
        self._steps: Any = None  # serve.engine.steps.Steps once loaded: runs each step, at once or ahead
        self.ahead = AheadReport()  # whether the host works ahead of the device (ASYNC_SCHEDULING), once loaded
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="engine", daemon=True)
        self.loaded: Any = None
        self.grammars: Any = None  # serve.engine.grammar.Grammars once loaded
        self.matchers: Any = None  # serve.engine.grammar.MatcherCompiler: builds matchers off the step, once loaded
        self.eos_ids: Any = None  # the token ids that end a sequence, once loaded
        self.limits: Optional[Limits] = None
        self.attention: Any = None  # the decode attention backend and why (decode_backends.AttentionReport)
        self.load_error: Optional[BaseException] = None
        self.adapters = AdapterTable()  # adapter swaps waiting for the next step, over the model's weight table

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
        return len(self.scheduler.running) if self.scheduler is not None else 0

    @property
    def waiting(self) -> int:
        """Requests admitted and not running: queued, or preempted and waiting to resume."""
        return self.scheduler.waiting if self.scheduler is not None else 0

    @property
    def in_flight(self) -> int:
        return self.scheduler.in_flight if self.scheduler is not None else 0

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
        return [EngineLoad(self.in_flight, self._served, self.graphs, compiled, self.attention, self.ahead)]

    def stats(self) -> EngineStats:
        """The KV pool's use and the prefix cache's counters (zeros before the model is loaded)."""
        scheduler = self.scheduler
        if scheduler is None:
            return EngineStats()
        blocks = scheduler.blocks
        speculation = scheduler.speculator.stats if scheduler.speculator is not None else None
        return EngineStats(
            blocks.used_blocks,
            blocks.usable_blocks,
            blocks.stats.queried_tokens,
            blocks.stats.hit_tokens,
            scheduler.preemptions,
            scheduler.peak_running,
            self._steps.count,
            self._steps.busy_seconds,
            speculative_proposer=speculation.proposer if speculation else "",
            speculative_proposed=speculation.proposed if speculation else 0,
            speculative_accepted=speculation.accepted if speculation else 0,
            speculative_lengths=tuple(speculation.accepted_lengths) if speculation else (),
            step_paths=tuple(self._runner.step_paths),
            steps_ahead=self._steps.ahead_count,
        )

    def submit(self, request: Request, sink: Optional[queue.Queue] = None, index: int = 0) -> RequestStream:
        """Queue a request (EngineNotReady before load; the front decides how many may be in flight) and return its
        stream.

        ``sink`` and ``index``: put this request's events, tagged with ``index``, into a queue shared with others.
        """
        if not self.ready:
            raise EngineNotReady.because(self.load_error)
        stream = RequestStream(request, self.cancel, sink, index)
        with self.adapters.admitting(request.adapter):  # AdapterNotLoaded for a deleted adapter
            self._streams[request.id] = stream
            self.matchers.submit(request, self.scheduler.add, self.scheduler.cancel)
        self._served += 1
        return stream

    def cancel(self, request_id: str) -> None:
        if self.scheduler is not None:
            self.matchers.cancel(request_id)
            self.scheduler.cancel(request_id)

    def close_session(self, session_id: str) -> None:
        """Unpin the session's prefix-cache blocks (its conversation's KV cache), so eviction may reuse them.

        Any thread may call it; the engine thread releases the blocks before its next step."""
        if self.scheduler is not None:
            self.scheduler.close_session(session_id)

    def install_adapter(self, name: str, modules: Any) -> Future:
        """Prepare an adapter's weights (read by serve.engine.lora.read_adapter) on the calling thread; the future
        resolves once the engine thread has linked them in, between two steps."""
        from serve.engine.lora import prepare_adapter

        prepared = prepare_adapter(self.loaded.model, name, modules)
        if self._runner.ranks is not None:  # every rank takes its share of the same weights, before any request
            self._runner.ranks.send_adapter(name, modules)
        return self.adapters.install(name, prepared)

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
        ranks = getattr(self.loaded, "ranks", None)
        if ranks is not None:
            ranks.stop()

    def _main(self) -> None:
        if not self._start_serving():
            return
        steps = self._steps
        while not self._stopping.is_set():
            ahead = self.ahead.enabled  # read once a step: a measurement may turn it off between steps
            if not (ahead and steps.may_work_ahead(self.adapters.busy)):
                steps.collect()
            if self.adapters.busy:  # runtime adapter swaps, between steps (none in flight)
                self.adapters.run_pending(self._uses_adapter)
            plan = self.scheduler.schedule(ahead=steps.pending is not None)
            if plan is None:  # a sequence whose token is on the device would be preempted: read it first
                steps.collect()
                continue
            self._deliver(plan.ended)
            if plan.empty:
                if steps.pending is None:
                    self._flush()
                    self.scheduler.wait_for_work(timeout=0.1)
                steps.collect()
                continue
            steps.ahead(plan) if ahead else steps.at_once(plan)
            self._flush()
        steps.collect()

    def _start_serving(self) -> bool:
        """Load the model and announce the outcome; False when the load failed."""
        try:
            self._prepare()
        except BaseException as exc:  # noqa: BLE001 - reported, then the worker decides to exit
            self.load_error = exc
            log.error("model load failed: %s", exc)
            if self._on_load_failure is not None:
                self._on_load_failure(exc)
            return False
        self._ready.set()
        log.info("engine ready: %s", self.limits)
        if self._on_ready is not None:
            self._on_ready()
        return True

    def _lose_ranks(self, exc: Exception) -> None:
        """A step of a tensor-parallel engine failed: a rank died, hung past the collectives' timeout, or failed.
        The engine stops serving: every request in flight ends with an error, the ranks are stopped, and the
        failure is reported as a load failure is (the engine process then exits and its pool starts it again)."""
        ranks = self._runner.ranks
        where = ranks.failed_rank() or f"a tensor-parallel step failed ({type(exc).__name__}: {exc})"
        log.error("engine stops serving: %s", where)
        self.load_error = RuntimeError(where)
        self._ready.clear()
        self._stopping.set()
        self._deliver(self.scheduler.fail_all(where))
        self._flush()
        ranks.stop()
        if self._on_load_failure is not None:
            self._on_load_failure(self.load_error)

    def _deliver(self, events: list[Event]) -> None:
        """Put each event into its request's stream; a final event retires the stream."""
        for request_id, event in events:
            stream = self._streams[request_id] if event.finish_reason is None else self._streams.pop(request_id)
            if event.finish_reason is not None:
                self.matchers.discard(request_id)  # a matcher built for a request that never started
            stream.put(event)

    def _flush(self) -> None:
        if self._flush_events is not None:
            self._flush_events()

    def _prepare(self) -> None:
        """Load the model, size the KV pool, build the runner and the scheduler (torch is imported here, off the
        HTTP threads)."""
        from serve.engine.block_manager import BlockManager
        from serve.engine.decode_backends import install_decode_backend
        from serve.engine.draft import target_share
        from serve.engine.grammar import Grammars, MatcherCompiler
        from serve.engine.kv_cache import CacheShape, PagedKVCache, layer_devices, plan_blocks, storage_dtype
        from serve.engine.kv_memory import cache_room
        from serve.engine.runner import ModelRunner

        self.loaded = self._load()
        budget = prefill_token_budget(self.config.max_batch_prefill_tokens, getattr(self.loaded, "device", None))
        config = self.config = dataclasses.replace(self.config, max_batch_prefill_tokens=budget)
        total = total_token_limit(self.loaded.max_context, config.max_total_tokens)
        max_input = min(config.max_input_tokens or total - 1, total - 1)
        model = self.loaded.model
        kv_dtype = storage_dtype(config.kv_cache_dtype, self.loaded.dtype)  # KV_CACHE_DTYPE=fp8: float8 e4m3
        shape = CacheShape.of(model.config, kv_dtype, getattr(model, "serve_kv_heads", None))
        devices = layer_devices(self.loaded.model, shape.layers)  # a model split over GPUs: a cache per layer's GPU
        size = config.kv_block_size
        ranks = getattr(self.loaded, "ranks", None)  # the other tensor-parallel ranks, if any
        max_batch = min(config.max_batch_size or config.max_concurrent_requests, config.max_concurrent_requests)
        share = target_share(shape, getattr(self.loaded, "draft", None), self.loaded.dtype)  # a draft's cache: the rest
        room = cache_room(model, shape, devices, config, total, max_batch, ranks, share)  # measured on CUDA
        blocks = plan_blocks(shape, size, config.max_batch_total_tokens, room, total + size)
        self.eos_ids = eos_token_ids(self.loaded.model, self.loaded.tokenizer)
        vocab = self.loaded.model.config.get_text_config().vocab_size
        self.grammars = Grammars(self.loaded.tokenizer, vocab, self.eos_ids, config.grammar_limits)
        self.matchers = MatcherCompiler(self.grammars)
        cache = PagedKVCache(shape, blocks, size, devices)
        self.attention = install_decode_backend(cache, config.attention_backend, config.c_compiler)
        cpu_threads = getattr(self.loaded, "cpu_threads", None)
        if ranks is not None:
            from serve.engine.ranks import BuildCache

            backend = (self.attention.backend, config.c_compiler, config.kv_cache_dtype)  # rank 0's kernel, dtype
            ranks.send(BuildCache(blocks, size, max_batch, -(-total // size), *backend))
        self._runner = ModelRunner(model, cache, self.grammars, max_batch, -(-total // size), cpu_threads, ranks)
        if config.compile_cache_dir:  # before the graphs, so that they capture the compiled kernels
            self._runner.compile_layers(config.compile_cache_dir)
        if config.cuda_graphs:
            self._capture_graphs()
        self.scheduler = self._scheduler(BlockManager(blocks, size, config.enable_prefix_caching), max_batch)
        self._start_steps(ranks)
        self.limits = Limits(max_input, total, (blocks - 1) * size, max_batch, size, blocks - 1, budget)
        lora = getattr(model, "serve_lora", None)
        if lora is not None and ranks is not None:  # an adapter leaves every rank when it leaves rank 0
            lora.on_remove = ranks.send_adapter_removal
        self.adapters.attach(lora)

    def _start_steps(self, ranks: Any) -> None:
        """What runs each step, and whether it works ahead of the device (ASYNC_SCHEDULING; the log says why)."""
        from serve.engine.steps import Steps

        self._steps = Steps(self._runner, self.scheduler, self._deliver, self._lose_ranks)
        speculative = self.scheduler.speculator is not None
        unshared = ranks is not None and getattr(self.loaded.model, "parallel", None) is None  # no broadcast of ids
        self.ahead = works_ahead(self.config.async_scheduling, self._runner.device, speculative, unshared)
        log.info("async scheduling %s", self.ahead.reason)

    def _capture_graphs(self) -> None:
        """CUDA_GRAPHS: capture the decode shapes; under an EAGLE-3 head the lean model keeps the states of the
        head's layers in the graphs too (a transformers model gives them through hooks, which replays skip)."""
        model = self.loaded.model
        if self._reads_hidden_states() and model.device.type == "cuda":
            if not hasattr(model, "serve_aux_layers"):
                self._runner.graphs_off("the EAGLE-3 head reads this model's states through hooks, which replays skip")
                return
            model.serve_aux_layers = frozenset(self.loaded.draft.aux_layers)
        widest = self.config.max_batch_prefill_tokens + self._runner.static.max_batch  # a step's most tokens
        self._runner.capture_graphs(widest)

    def _reads_hidden_states(self) -> bool:
        """Whether the proposer is an EAGLE-3 head, which reads the target's hidden states."""
        return bool(getattr(getattr(self.loaded, "draft", None), "serve_eagle3", False))

    def _scheduler(self, pool: Any, max_batch: int) -> Scheduler:
        """The scheduler over the KV pool, with the speculator SPECULATIVE asks for (the log says which); a draft
        model proposes with a cache of the pool's blocks."""
        from serve.engine.draft import DraftProposer
        from serve.engine.eagle3 import Eagle3Proposer
        from serve.engine.speculative import make_speculator

        draft = getattr(self.loaded, "draft", None)
        size, dtype = pool.block_size, self.loaded.dtype
        proposer = None
        if self._reads_hidden_states():
            proposer = Eagle3Proposer.build(draft, self.loaded.model, pool.num_blocks, size, dtype, self.config)
            self._runner.hidden_observer = proposer.record
        elif draft is not None:
            proposer = DraftProposer.build(draft, pool.num_blocks, size, dtype, self.config)
        speculator = make_speculator(self.config, proposer)
        forget = self._runner.forget if speculator is None else speculator.forgetting(self._runner.forget)
        budget = self.config.max_batch_prefill_tokens
        return Scheduler(pool, max_batch, budget, self._new_sequence, forget, self._cache_key, speculator=speculator)

    def _new_sequence(self, request: Request) -> Sequence:
        """A request's Sequence, with its RNG and grammar matcher (raises for a request that cannot start)."""
        generator = self._runner.generator_for(request.params)
        matcher = self.matchers.take(request)
        seq = Sequence(request, self.loaded.tokenizer, self.eos_ids, generator, matcher)
        if request.images is not None:  # encoded once, here; every prefill chunk (and a recompute) reuses them
            from serve.engine.multimodal import encode_images

            seq.images = encode_images(self.loaded.model, request.prompt_ids, request.images, self._runner.device)
        return seq

    def _cache_key(self, request: Request) -> Optional[str]:
        """What a request's prefix-cache keys name besides its tokens: its adapter by name and install number (a name
        deleted and registered again from another folder never meets the old one's blocks), and its cache salt, so
        that different salts never share a block, and its images' digests. An adapter's part ends in ``#<number>``,
        a salted key is a JSON list of two, one with images a list of three: the forms never meet."""
        adapter, lora = request.adapter, getattr(self.loaded.model, "serve_lora", None)
        named = adapter if adapter is None or lora is None else f"{adapter}#{lora.index(adapter)}"
        if request.images is not None:  # the same tokens with other images are another prefix
            return json.dumps([named, request.cache_salt, list(request.images.digests)])
        return named if request.cache_salt is None else json.dumps([named, request.cache_salt])
