"""Prometheus metrics: request counts, token counts, latency histograms, and the engine's live state."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serve.engine.types import STEP_PATHS, TokenEvent

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


GAUGES = {  # name: (help, how workers combine in multiprocess mode)
    "serve_queue_size": ("Requests admitted and waiting for KV blocks", "livesum"),
    "serve_batch_current_size": ("Sequences in the running batch", "livesum"),
    "serve_requests_in_flight": ("Requests admitted and not finished", "livesum"),
    "serve_ready": ("1 once the model is loaded and serving (in every worker)", "livemin"),
    "serve_kv_blocks_used": ("KV-cache blocks held by sequences", "livesum"),
    "serve_kv_blocks_total": ("KV-cache blocks in the pool", "livesum"),
    "serve_batch_peak_size": ("Most sequences running at once since start", "livesum"),
    "serve_engines_ready": ("Copies of the model ready to serve (a dead, reloading or stalled one is not)", "livesum"),
}
COUNTERS = {
    "serve_prefix_cache_queries": "Prompt tokens looked up in the prefix cache",
    "serve_prefix_cache_hits": "Prompt tokens found in the prefix cache",
    "serve_preemptions": "Sequences preempted because the KV pool was full",
    "serve_engine_steps": "Forward steps the engine ran",
    "serve_engine_steps_ahead": "Steps launched while the step before them still ran (ASYNC_SCHEDULING)",
    "serve_engine_busy_seconds": "Seconds the engine thread spent in steps (over wall time: its busy share)",
    "serve_engine_restarts": "Engine processes started again after one died while serving",
}
LABELLED_COUNTERS = {  # name: (help, labels); one series per path, per proposer (and per accepted length)
    "serve_engine_steps_by_path": (
        "Forward steps by path: a decode graph's replay (graph), the fixed decode shape run eagerly (fixed_shape), "
        "a step with prompt chunks whose layer halves replayed graphs (piecewise), any other step (eager: prompt "
        "chunks, mixed steps, adapters)",
        ("path",),
    ),
    "serve_speculative_proposed_tokens": ("Tokens proposed by speculative decoding and verified", ("proposer",)),
    "serve_speculative_accepted_tokens": ("Proposed tokens the model accepted", ("proposer",)),
    "serve_speculative_verifications": (
        "Verified proposals by how many of their tokens were accepted (the accepted-length histogram)",
        ("proposer", "accepted"),
    ),
}


def labelled_counts(stats: Any) -> dict[str, dict[tuple[str, ...], float]]:
    """The labelled counters by name, then by label values: steps by path, and speculative decoding's (none while
    SPECULATIVE is off)."""
    counts = {"serve_engine_steps_by_path": {(path,): count for path, count in zip(STEP_PATHS, stats.step_paths)}}
    proposer = stats.speculative_proposer
    if not proposer:
        return counts
    return counts | {
        "serve_speculative_proposed_tokens": {(proposer,): stats.speculative_proposed},
        "serve_speculative_accepted_tokens": {(proposer,): stats.speculative_accepted},
        "serve_speculative_verifications": {
            (proposer, str(length)): count for length, count in enumerate(stats.speculative_lengths)
        },
    }


def engine_state(engine: Any) -> tuple[dict[str, float], dict[str, float]]:
    """The engine's live gauges and its cumulative counts, by metric name."""
    stats = engine.stats()
    gauges = {
        "serve_queue_size": engine.waiting,
        "serve_batch_current_size": engine.running,
        "serve_requests_in_flight": engine.in_flight,
        "serve_ready": 1 if engine.ready else 0,
        "serve_kv_blocks_used": stats.blocks_used,
        "serve_kv_blocks_total": stats.blocks_total,
        "serve_batch_peak_size": stats.peak_running,
        "serve_engines_ready": sum(1 for copy in engine.engines if copy.ready),
    }
    counts = {
        "serve_prefix_cache_queries": stats.prefix_queried_tokens,
        "serve_prefix_cache_hits": stats.prefix_hit_tokens,
        "serve_preemptions": stats.preemptions,
        "serve_engine_steps": stats.steps,
        "serve_engine_steps_ahead": stats.steps_ahead,
        "serve_engine_busy_seconds": stats.busy_seconds,
        "serve_engine_restarts": stats.restarts,
    }
    return gauges, counts


class EngineCollector:
    """Reads the engine's state at scrape time (the engine itself knows nothing of Prometheus)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        gauges, counts = engine_state(self.engine)
        for name, value in gauges.items():
            yield GaugeMetricFamily(name, GAUGES[name][0], value=value)
        for name, value in counts.items():
            yield CounterMetricFamily(name, COUNTERS[name], value=value)
        for name, series in labelled_counts(self.engine.stats()).items():
            text, labels = LABELLED_COUNTERS[name]
            family = CounterMetricFamily(name, text, labels=labels)
            for values, value in series.items():
                family.add_metric(list(values), value)
            yield family


class LiveGauges:
    """The engine's state as multiprocess gauges and counters (over live workers), refreshed every ``interval`` s.

    In prometheus-client's multiprocess mode each worker writes its values to files that any worker's ``/metrics``
    reads; a collector that asks the engine at scrape time would only ever see the worker that was asked.
    """

    def __init__(self, engine: Any, interval: float = 0.25):
        self.engine = engine
        self.gauges = {
            name: Gauge(name, text, multiprocess_mode=mode, registry=None) for name, (text, mode) in GAUGES.items()
        }
        self.counters = {name: Counter(name, text, registry=None) for name, text in COUNTERS.items()}
        self._counted = dict.fromkeys(COUNTERS, 0.0)
        self.labelled = {
            name: Counter(name, text, labels, registry=None) for name, (text, labels) in LABELLED_COUNTERS.items()
        }
        self._labelled_counted: dict[tuple[str, tuple[str, ...]], float] = {}
        self._lock = threading.Lock()
        self.refresh()
        threading.Thread(target=self._run, args=(interval,), name="metrics-gauges", daemon=True).start()

    def refresh(self) -> None:
        with self._lock:
            gauges, counts = engine_state(self.engine)
            for name, value in gauges.items():
                self.gauges[name].set(value)
            for name, value in counts.items():  # counters grow by what the engine counted since the last refresh
                if value > self._counted[name]:
                    self.counters[name].inc(value - self._counted[name])
                    self._counted[name] = value
            self._refresh_labelled()

    def _refresh_labelled(self) -> None:
        """The labelled counters grow by what the engine counted since the last refresh (each series shown from its
        first refresh, at zero until it counts)."""
        for name, series in labelled_counts(self.engine.stats()).items():
            for values, value in series.items():
                counter = self.labelled[name].labels(*values)
                counted = self._labelled_counted.get((name, values), 0.0)
                if value > counted:
                    counter.inc(value - counted)
                    self._labelled_counted[(name, values)] = value

    def _run(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            self.refresh()


class Metrics:
    """One registry per app, so tests can build apps freely; with ``multiprocess_dir`` (gunicorn with several
    workers) values live in prometheus-client's multiprocess files and ``/metrics`` aggregates every worker."""

    def __init__(self, engine: Any, multiprocess_dir: Optional[str] = None):
        self.registry = CollectorRegistry()
        self.multiprocess_dir = multiprocess_dir
        registry = self.registry
        self.requests = Counter(
            "serve_requests", "HTTP requests by route and status", ["route", "status"], registry=registry
        )
        self.finished = Counter(
            "serve_generations", "Finished generations by finish reason", ["finish_reason"], registry=registry
        )
        self.prompt_tokens = Counter("serve_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.generated_tokens = Counter("serve_generated_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram(
            "serve_time_to_first_token_seconds", "Queue + prefill time", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.tpot = Histogram(
            "serve_time_per_output_token_seconds",
            "Decode time per generated token",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "serve_queue_seconds", "Time waiting for KV blocks", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.generated_per_request = Histogram(
            "serve_generated_tokens_per_request",
            "Tokens generated per request",
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.live = LiveGauges(engine) if multiprocess_dir else None
        if self.live is None:
            registry.register(EngineCollector(engine))
        self.listeners: list[Callable[[TokenEvent], None]] = []  # also told of every finished generation (EMF)

    def observe(self, final: TokenEvent) -> None:
        """Record a finished generation from its final event."""
        self.finished.labels(final.finish_reason.value if final.finish_reason else "unknown").inc()
        self.prompt_tokens.inc(final.prompt_tokens)
        self.generated_tokens.inc(final.generated_tokens)
        self.generated_per_request.observe(final.generated_tokens)
        for listener in self.listeners:
            listener(final)
        if final.timings is None:
            return
        self.queue_time.observe(final.timings.queue)
        self.ttft.observe(final.timings.queue + final.timings.prefill)
        if final.generated_tokens > 1:
            self.tpot.observe(final.timings.decode / (final.generated_tokens - 1))

    def render(self) -> bytes:
        """The metrics in Prometheus' text format (of every worker, in multiprocess mode)."""
        if self.live is None:
            return generate_latest(self.registry)
        self.live.refresh()  # this worker's share is current; the others' are at most a refresh interval old
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return generate_latest(registry)
