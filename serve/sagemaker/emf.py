"""Autoscaling metrics as CloudWatch embedded metric format (EMF) lines on stdout.

SageMaker never scrapes ``/metrics``, but it ships the container's stdout to CloudWatch Logs, which turns each
EMF line (one JSON object whose ``_aws.CloudWatchMetrics`` block names the metrics, units and dimensions) into
CloudWatch metrics. Every ``CLOUDWATCH_METRICS_INTERVAL`` seconds one line reports the queue, the running batch,
KV-cache use, output tokens/s, TTFT p50/p90 and the 429s of the interval, dimensioned by endpoint and variant.

A small writer rather than ``aws-embedded-metrics``: that library flushes through asyncio and, unless told its
environment, probes the network to find one; here one JSON line per interval on stdout is the whole job.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from typing import Any, Callable, Optional

from serve.engine.types import TokenEvent

log = logging.getLogger(__name__)

UNITS = {  # metric name -> CloudWatch unit; deploy/deploy.py --scale-on tracks some of these by name
    "QueueLength": "Count",
    "RunningSequences": "Count",
    "KVCacheUsage": "Percent",
    "OutputTokensPerSecond": "Count/Second",
    "TimeToFirstTokenP50": "Milliseconds",
    "TimeToFirstTokenP90": "Milliseconds",
    "Throttled429": "Count",
}


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of ``values`` (0 when there are none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(fraction * len(ordered)))) - 1]


def counter_total(counter: Any, **labels: str) -> float:
    """The sum of a prometheus counter's ``_total`` samples whose labels include ``labels``."""
    return sum(
        sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and all(sample.labels.get(key) == value for key, value in labels.items())
    )


class EmfReporter:
    """Samples the engine and the app's metrics, and writes one EMF line per interval."""

    def __init__(
        self,
        engine: Any,
        metrics: Any,
        namespace: str,
        dimensions: dict[str, str],
        interval: float,
        write: Optional[Callable[[str], None]] = None,
        clock: Callable[[], float] = time.time,
    ):
        self.engine, self.metrics, self.namespace, self.interval = engine, metrics, namespace, interval
        self.dimensions = dimensions or {"Service": namespace}
        self._write = write or _stdout
        self._clock = clock
        self._lock = threading.Lock()
        self._ttfts: list[float] = []
        self._last = (clock(), counter_total(metrics.generated_tokens), counter_total(metrics.requests, status="429"))
        self._stop = threading.Event()
        metrics.listeners.append(self._observe)

    def _observe(self, final: TokenEvent) -> None:
        if final.timings is not None and final.generated_tokens > 0:
            with self._lock:
                self._ttfts.append(final.timings.queue + final.timings.prefill)

    def values(self) -> dict[str, float]:
        """This interval's metric values (and the start of the next interval)."""
        now, tokens, throttled = (
            self._clock(),
            counter_total(self.metrics.generated_tokens),
            counter_total(self.metrics.requests, status="429"),
        )
        then, tokens_then, throttled_then = self._last
        self._last = (now, tokens, throttled)
        with self._lock:
            ttfts, self._ttfts = self._ttfts, []
        ready = self.engine.ready
        return {
            "QueueLength": self.engine.waiting if ready else 0,
            "RunningSequences": self.engine.running if ready else 0,
            "KVCacheUsage": kv_cache_percent(self.engine) if ready else 0.0,
            "OutputTokensPerSecond": round((tokens - tokens_then) / max(now - then, 1e-9), 3),
            "TimeToFirstTokenP50": round(percentile(ttfts, 0.5) * 1000, 3),
            "TimeToFirstTokenP90": round(percentile(ttfts, 0.9) * 1000, 3),
            "Throttled429": int(throttled - throttled_then),
        }

    def line(self) -> str:
        """One EMF document: the ``_aws`` metadata, the dimension values and the metric values."""
        directive = {
            "Namespace": self.namespace,
            "Dimensions": [sorted(self.dimensions)],
            "Metrics": [{"Name": name, "Unit": unit} for name, unit in UNITS.items()],
        }
        document = {"_aws": {"Timestamp": int(self._clock() * 1000), "CloudWatchMetrics": [directive]}}
        document.update(self.dimensions)
        document.update(self.values())
        return json.dumps(document, separators=(",", ":"))

    def start(self) -> "EmfReporter":
        threading.Thread(target=self._run, name="cloudwatch-emf", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write(self.line())
            except Exception:  # noqa: BLE001 - metrics must never take the server down
                log.exception("could not write the CloudWatch metrics line")


def kv_cache_percent(engine: Any) -> float:
    """Share of the KV cache in use: blocks held by sequences (and pinned sessions) over the pool's blocks."""
    stats = engine.stats()
    if not stats.blocks_total:
        return 0.0
    return round(100.0 * stats.blocks_used / stats.blocks_total, 3)


def _stdout(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def reporter_for(settings: Any, engine: Any, metrics: Any) -> Optional[EmfReporter]:
    """The started reporter when CLOUDWATCH_METRICS is on, else None."""
    if not settings.cloudwatch_metrics:
        return None
    dimensions = {
        key: value
        for key, value in (("EndpointName", settings.endpoint_name), ("VariantName", settings.variant_name))
        if value
    }
    return EmfReporter(engine, metrics, settings.cloudwatch_namespace, dimensions, settings.cloudwatch_interval).start()
