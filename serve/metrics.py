"""Prometheus metrics: request counts, token counts, latency histograms, and the engine's live state."""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
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


class Metrics:
    """One registry per app, so tests can build apps freely."""

    def __init__(self, engine: Any):
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("serve_requests", "HTTP requests by route and status", ["route", "status"], registry=registry)
        self.finished = Counter("serve_generations", "Finished generations by finish reason", ["finish_reason"], registry=registry)
        self.prompt_tokens = Counter("serve_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.generated_tokens = Counter("serve_generated_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram("serve_time_to_first_token_seconds", "Queue + prefill time", buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("serve_time_per_output_token_seconds", "Decode time per generated token", buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_time = Histogram("serve_queue_seconds", "Time waiting for a cache slot", buckets=LATENCY_BUCKETS, registry=registry)
        self.generated_per_request = Histogram("serve_generated_tokens_per_request", "Tokens generated per request", buckets=TOKEN_BUCKETS, registry=registry)
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
        return generate_latest(self.registry)
