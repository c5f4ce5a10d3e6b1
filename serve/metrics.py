"""Prometheus metrics: request counts, token counts, latency histograms, and the engine's live state."""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

from serve.engine.types import TokenEvent

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class EngineCollector:
    """Reads the engine's queue and batch at scrape time (the engine itself knows nothing of Prometheus)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("serve_queue_size", "Requests admitted and waiting for a cache slot", value=self.engine.scheduler.waiting)
        yield GaugeMetricFamily("serve_batch_current_size", "Sequences in the running batch", value=self.engine.running)
        yield GaugeMetricFamily("serve_requests_in_flight", "Requests admitted and not finished", value=self.engine.scheduler.in_flight)
        yield GaugeMetricFamily("serve_ready", "1 once the model is loaded and serving", value=1 if self.engine.ready else 0)


class LiveGauges:
    """The engine's live state as multiprocess gauges (summed over live workers), refreshed every ``interval`` s.

    In prometheus-client's multiprocess mode each worker writes its values to files that any worker's ``/metrics``
    reads; a collector that asks the engine at scrape time would only ever see the worker that was asked.
    """

    def __init__(self, engine: Any, interval: float = 0.25):
        self.engine = engine
        self.gauges = {
            name: Gauge(name, text, multiprocess_mode=mode, registry=None)
            for name, text, mode in (
                ("serve_queue_size", "Requests admitted and waiting for a cache slot", "livesum"),
                ("serve_batch_current_size", "Sequences in the running batch", "livesum"),
                ("serve_requests_in_flight", "Requests admitted and not finished", "livesum"),
                ("serve_ready", "1 once the model is loaded and serving (in every worker)", "livemin"),
            )
        }
        self.refresh()
        threading.Thread(target=self._run, args=(interval,), name="metrics-gauges", daemon=True).start()

    def refresh(self) -> None:
        engine = self.engine
        self.gauges["serve_ready"].set(1 if engine.ready else 0)
        self.gauges["serve_queue_size"].set(engine.scheduler.waiting)
        self.gauges["serve_batch_current_size"].set(engine.running)
        self.gauges["serve_requests_in_flight"].set(engine.scheduler.in_flight)

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
        self.requests = Counter("serve_requests", "HTTP requests by route and status", ["route", "status"], registry=registry)
        self.finished = Counter("serve_generations", "Finished generations by finish reason", ["finish_reason"], registry=registry)
        self.prompt_tokens = Counter("serve_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.generated_tokens = Counter("serve_generated_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram("serve_time_to_first_token_seconds", "Queue + prefill time", buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("serve_time_per_output_token_seconds", "Decode time per generated token", buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_time = Histogram("serve_queue_seconds", "Time waiting for a cache slot", buckets=LATENCY_BUCKETS, registry=registry)
        self.generated_per_request = Histogram("serve_generated_tokens_per_request", "Tokens generated per request", buckets=TOKEN_BUCKETS, registry=registry)
        self.live = LiveGauges(engine) if multiprocess_dir else None
        if self.live is None:
            registry.register(EngineCollector(engine))

    def observe(self, final: TokenEvent) -> None:
        """Record a finished generation from its final event."""
        self.finished.labels(final.finish_reason.value if final.finish_reason else "unknown").inc()
        self.prompt_tokens.inc(final.prompt_tokens)
        self.generated_tokens.inc(final.generated_tokens)
        self.generated_per_request.observe(final.generated_tokens)
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
