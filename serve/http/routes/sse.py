"""Server-Sent Events: the streaming loop every route shares, and its framing (data lines, keep-alive comments,
in-band errors, the [DONE] marker)."""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Iterator, Optional

from flask import Response, stream_with_context

from serve.engine import TokenEvent
from serve.errors import ErrorStyle, GenerationFailed, styled_body

Events = Iterable[Optional[tuple[int, TokenEvent]]]  # (choice index, event) pairs, None on silence
Render = Callable[[int, TokenEvent], Iterable[str]]  # one (choice index, event) -> its SSE chunks
End = Callable[[dict[int, TokenEvent]], Iterable[str]]  # every choice's final event -> the stream's last chunks

KEEPALIVE = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"
KEEPALIVE_SECONDS = 10.0
MAX_CHUNKS_PER_WRITE = 64


def event(data: Any, name: Optional[str] = None) -> str:
    """One SSE event: ``data: {json}\\n\\n`` (with an ``event:`` line when named)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    prefix = f"event: {name}\n" if name else ""
    return f"{prefix}data: {payload}\n\n"


def stream(events: Events, render: Render, style: ErrorStyle, end: Optional[End] = None) -> Iterator[str]:
    """The chunks of a streamed generation's ``events`` (read with a ``KEEPALIVE_SECONDS`` heartbeat): each event as
    ``render`` has it, a keep-alive comment on silence, then ``end(finals)`` once every choice has finished; a failed
    generation ends it with ``event: error`` whose body has the stream's API ``style``."""
    finals: dict[int, TokenEvent] = {}
    try:
        for item in events:
            if item is None:
                yield KEEPALIVE
                continue
            index, token = item
            yield from render(index, token)
            if token.finish_reason is not None:
                finals[index] = token
        if end is not None:
            yield from end(finals)
    except GenerationFailed as exc:
        yield event(styled_body(exc, style)[0], name="error")


def coalesce(chunks: Iterator[str], pending: Callable[[], bool]) -> Iterator[str]:
    """Join the chunks of events that are already waiting into one write.

    Each event stays its own SSE chunk on the wire, but when the engine has queued several events for this stream
    (the HTTP thread fell behind), they go out in one socket write instead of one write and one thread wake-up
    each. Nothing is held back: as soon as no event is pending, what is buffered is written.
    """
    buffered: list[str] = []
    for chunk in chunks:
        buffered.append(chunk)
        if len(buffered) >= MAX_CHUNKS_PER_WRITE or not pending():
            yield "".join(buffered)
            buffered.clear()
    if buffered:
        yield "".join(buffered)


def response(chunks: Iterator[str], pending: Optional[Callable[[], bool]] = None) -> Response:
    """A streaming response that proxies (and SageMaker) pass through unbuffered; with ``pending`` (are more
    events already waiting?), events that are ready together share one write."""
    return Response(
        stream_with_context(chunks if pending is None else coalesce(chunks, pending)),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
