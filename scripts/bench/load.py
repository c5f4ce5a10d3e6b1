"""The client load generator: streaming /v1/chat/completions requests from N concurrent threads."""

from __future__ import annotations

import json
import math
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import requests

try:
    from tqdm import tqdm
except ImportError:  # progress bars are a nicety, not a requirement
    tqdm = None


@dataclass(frozen=True)
class Endpoint:
    """Where and how to send chat requests to one server."""

    base_url: str
    model: str
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass
class RequestResult:
    """One streamed request as the client saw it."""

    ok: bool
    ttft_s: float | None = None
    latency_s: float = 0.0
    output_tokens: int = 0
    error: str | None = None
    text: str = ""
    prompt_tokens: int | None = None  # from the usage chunk
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when the server reports it
    token_gaps_s: list[float] = field(default_factory=list)  # between consecutive content chunks (inter-token latency)


@dataclass
class LevelResult:
    """The aggregate of one concurrency level."""

    concurrency: int
    requests: int
    errors: int
    wall_s: float
    output_tokens: int
    output_tok_per_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    latency_p50_ms: float | None
    tokens_per_request_min: int = 0
    first_error: str | None = None
    prompt_tokens_min: int | None = None
    prompt_tokens_max: int | None = None
    cached_tokens: int | None = None  # summed over the level's requests; None when no request reported it
    itl_p50_ms: float | None = None  # inter-token latency: gaps between content chunks, over all requests
    itl_p95_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


Prompt = str | list[dict[str, str]]  # one user message, or the whole message list


def chat_body(endpoint: Endpoint, prompt: Prompt, max_tokens: int) -> dict[str, Any]:
    """The request body: greedy, streaming, with usage in the last chunk."""
    body = {
        "model": endpoint.model,
        "messages": [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(endpoint.extra_body)
    return body


def sse_data(response: requests.Response) -> Iterator[str]:
    """The ``data:`` payloads of an SSE response as they arrive; raises on an ``event: error``."""
    event_name = ""
    for raw in response.iter_lines(chunk_size=None):
        line = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        if not line:
            event_name = ""
        elif line.startswith("event:"):
            event_name = line[6:].strip()
        elif line.startswith("data:"):
            payload = line[5:].strip()
            if event_name == "error":
                raise RuntimeError(f"server error event: {payload[:300]}")
            yield payload


def _chunk_text(chunk: dict[str, Any]) -> str:
    """The content delta of one chat chunk ('' when it has none)."""
    for choice in chunk.get("choices") or []:
        text = (choice.get("delta") or {}).get("content")
        if text:
            return text
    return ""


def _record_usage(result: RequestResult, usage: dict[str, Any]) -> None:
    """Prompt and cached-prompt token counts from a usage object."""
    result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if cached is not None:
        result.cached_tokens = cached


def stream_chat(
    session: requests.Session, endpoint: Endpoint, prompt: Prompt, max_tokens: int, timeout_s: float
) -> RequestResult:
    """Send one streaming chat request and time it (TTFT = first non-empty content delta)."""
    started = time.perf_counter()
    result = RequestResult(ok=False)
    content_chunks, usage_tokens, done, finished = 0, None, False, False
    last_chunk = started
    try:
        with session.post(
            f"{endpoint.base_url}/v1/chat/completions",
            json=chat_body(endpoint, prompt, max_tokens),
            stream=True,
            timeout=(10, timeout_s),
        ) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
            for payload in sse_data(response):
                if payload == "[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    raise RuntimeError(f"error chunk: {payload[:300]}")
                text = _chunk_text(chunk)
                if text:
                    now = time.perf_counter()
                    result.text += text
                    content_chunks += 1
                    if result.ttft_s is None:
                        result.ttft_s = now - started
                    else:
                        result.token_gaps_s.append(now - last_chunk)
                    last_chunk = now
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens", usage_tokens)
                    _record_usage(result, chunk["usage"])
                finished = finished or any(c.get("finish_reason") for c in chunk.get("choices") or [])
        if not (done or finished):  # transformers serve ends after its finish_reason chunk, without [DONE]
            raise RuntimeError("stream ended without a finish_reason or data: [DONE]")
        result.ok = True
    except Exception as exc:  # any failure of one request is counted, never fatal to the run
        result.error = f"{type(exc).__name__}: {exc}"[:400]
    result.latency_s = time.perf_counter() - started
    result.output_tokens = usage_tokens if usage_tokens is not None else content_chunks
    return result


class _Clients:
    """One keep-alive requests.Session per worker thread."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._all: list[requests.Session] = []
        self._lock = threading.Lock()

    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
            with self._lock:
                self._all.append(self._local.session)
        return self._local.session

    def close(self) -> None:
        for session in self._all:
            session.close()


def summarize(concurrency: int, results: list[RequestResult], wall_s: float) -> LevelResult:
    """Aggregate per-request results into the level's figures."""
    good = [r for r in results if r.ok]
    ttfts = [r.ttft_s * 1000 for r in good if r.ttft_s is not None]
    latencies = [r.latency_s * 1000 for r in good]
    gaps = [gap * 1000 for r in good for gap in r.token_gaps_s]
    tokens = sum(r.output_tokens for r in good)
    errors = [r for r in results if not r.ok]
    prompt_tokens = [r.prompt_tokens for r in good if r.prompt_tokens is not None]
    cached = [r.cached_tokens for r in good if r.cached_tokens is not None]
    return LevelResult(
        concurrency=concurrency,
        requests=len(results),
        errors=len(errors),
        wall_s=round(wall_s, 3),
        output_tokens=tokens,
        output_tok_per_s=round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        ttft_p50_ms=_round(percentile(ttfts, 50)),
        ttft_p95_ms=_round(percentile(ttfts, 95)),
        latency_p50_ms=_round(percentile(latencies, 50)),
        tokens_per_request_min=min((r.output_tokens for r in good), default=0),
        first_error=errors[0].error if errors else None,
        prompt_tokens_min=min(prompt_tokens, default=None),
        prompt_tokens_max=max(prompt_tokens, default=None),
        cached_tokens=sum(cached) if cached else None,
        itl_p50_ms=_round(percentile(gaps, 50)),
        itl_p95_ms=_round(percentile(gaps, 95)),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def run_level(
    endpoint: Endpoint,
    prompts: list[Prompt],
    concurrency: int,
    n_requests: int,
    max_tokens: int,
    timeout_s: float,
    deadline: float,
    label: str = "",
) -> LevelResult:
    """Send ``n_requests`` (prompts in order, cycled) from ``concurrency`` threads; wall time covers them all.

    A request not started by ``deadline`` (time.monotonic) is counted as an error without being sent.
    """
    clients = _Clients()
    show_bar = tqdm is not None and sys.stderr.isatty()  # in a log file, the per-level summary lines suffice
    bar = tqdm(total=n_requests, desc=f"{label} c={concurrency}", unit="req", leave=False) if show_bar else None

    def one(index: int) -> RequestResult:
        if time.monotonic() > deadline:
            result = RequestResult(ok=False, error="not sent: the system's time budget ran out")
        else:
            result = stream_chat(clients.session(), endpoint, prompts[index % len(prompts)], max_tokens, timeout_s)
        if bar is not None:
            bar.update(1)
        return result

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(one, range(n_requests)))
    finally:
        clients.close()
        if bar is not None:
            bar.close()
    return summarize(concurrency, results, time.perf_counter() - started)
