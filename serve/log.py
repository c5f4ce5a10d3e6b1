"""Logging set-up and the one line logged per request, with its timings."""

from __future__ import annotations

import logging
import sys
from typing import Optional

from serve.engine.types import FinishReason, TokenEvent

request_log = logging.getLogger("serve.request")


def configure_logging(level: str = "INFO") -> None:
    """Plain single-line records on stderr, which SageMaker ships to CloudWatch."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def log_request(
    route: str, request_id: str, final: Optional[TokenEvent], stream: bool, reason: str = "client_disconnected"
) -> None:
    """One line per finished request: route, outcome, token counts and where the time went."""
    if final is None:
        request_log.info("route=%s id=%s stream=%s outcome=cancelled reason=%s", route, request_id, stream, reason)
        return
    timings = final.timings
    spent = (
        f"queue_ms={timings.queue * 1000:.1f} prefill_ms={timings.prefill * 1000:.1f} "
        f"decode_ms={timings.decode * 1000:.1f} total_ms={timings.total * 1000:.1f}"
        if timings
        else "timings=none"
    )
    outcome = final.finish_reason.value if final.finish_reason else "unknown"
    if final.finish_reason is FinishReason.CANCELLED:  # only a client that left cancels a request
        outcome += " reason=client_disconnected"
    request_log.info(
        "route=%s id=%s stream=%s outcome=%s prompt_tokens=%d cached_tokens=%d generated_tokens=%d %s",
        route,
        request_id,
        stream,
        outcome,
        final.prompt_tokens,
        final.cached_tokens,
        final.generated_tokens,
        spent,
    )
