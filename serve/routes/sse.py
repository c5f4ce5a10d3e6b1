"""Server-Sent Events framing: data lines, keep-alive comments, in-band errors, the [DONE] marker."""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional

from flask import Response, stream_with_context

KEEPALIVE = ": keep-alive\n\n"
DONE = "data: [DONE]\n\n"
KEEPALIVE_SECONDS = 10.0


def event(data: Any, name: Optional[str] = None) -> str:
    """One SSE event: ``data: {json}\\n\\n`` (with an ``event:`` line when named)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    prefix = f"event: {name}\n" if name else ""
    return f"{prefix}data: {payload}\n\n"


def response(chunks: Iterator[str]) -> Response:
    """A streaming response that proxies (and SageMaker) pass through unbuffered."""
    return Response(
        stream_with_context(chunks),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
