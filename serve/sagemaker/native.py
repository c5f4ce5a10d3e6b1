"""SageMaker-native parts of /invocations: session requests and session ids, and the invocation deadline."""

from __future__ import annotations

import json
import time
from typing import Iterable, Optional

from flask import Response, after_this_request, current_app, request

from serve.front.context import RequestContext
from serve.front.generation import Generation
from serve.errors import BadRequest
from serve.http.routes.common import request_context, settings
from serve.sagemaker.sessions import (
    CLOSE,
    CLOSED_SESSION_HEADER,
    NEW_SESSION,
    NEW_SESSION_HEADER,
    SESSION_HEADER,
    SessionStore,
    iso_time,
    session_request_type,
)

DISABLED = "stateful sessions are not enabled on this endpoint (set SAGEMAKER_ENABLE_STATEFUL_SESSIONS=true)"

FINISH_HEADER = "X-Finish-Reason"  # "deadline" when the answer was cut short to beat the invocation timeout
DEADLINE = "deadline"


def invocation_deadline(arrival: float, timeout: Optional[float], margin: float) -> Optional[float]:
    """When an answer must be cut short (``time.monotonic()``): ``margin`` seconds before the invocation ``timeout``
    runs out, counted from the request's ``arrival``; None without a timeout."""
    return None if timeout is None else arrival + timeout - margin


def _store() -> Optional[SessionStore]:
    return current_app.extensions.get("serve.sagemaker.sessions")


def _peek_json() -> Optional[object]:
    """The body as JSON when it is JSON, else None (custom handlers may take other content; json_body says why not)."""
    try:
        return json.loads(request.get_data(cache=True))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def session_response() -> Optional[Response]:
    """The answer to a ``{"requestType": "NEW_SESSION" | "CLOSE"}`` body; None for any other request."""
    kind = session_request_type(_peek_json())
    if kind is None:
        return None
    store = _store()
    if store is None:
        raise BadRequest(f"requestType: {DISABLED}", "requestType")
    if kind == NEW_SESSION:
        session_id, expires = store.create()
        response = Response(f"Session {session_id} created", 200, mimetype="text/plain")
        response.headers[NEW_SESSION_HEADER] = f"{session_id}; Expires={iso_time(expires)}"
        return response
    assert kind == CLOSE
    session_id = (request.headers.get(SESSION_HEADER) or "").strip()
    if not session_id:
        raise BadRequest(f"{SESSION_HEADER}: closing a session needs its id in this header", SESSION_HEADER)
    store.close(session_id)
    response = Response(f"Session {session_id} closed", 200, mimetype="text/plain")
    response.headers[CLOSED_SESSION_HEADER] = session_id
    return response


def invocation_context() -> RequestContext:
    """This call's context with its live session (a 400 for an unknown, closed or expired one) and its deadline."""
    session_id = (request.headers.get(SESSION_HEADER) or "").strip() or None
    if session_id is not None:
        store = _store()
        if store is None:
            raise BadRequest(f"{SESSION_HEADER}: {DISABLED}", SESSION_HEADER)
        _hold_until_answered(store, session_id)
    config = settings()
    deadline = invocation_deadline(_arrival(), config.invocation_timeout, config.invocation_timeout_margin)
    return request_context(session_id=session_id, deadline=deadline)


def _hold_until_answered(store: SessionStore, session_id: str) -> None:
    """Count this request in flight on its session until its response is closed (sent, abandoned or failed)."""
    store.begin(session_id)

    @after_this_request
    def finish_when_closed(response: Response) -> Response:
        response.call_on_close(lambda: store.finish(session_id))
        return response


def _arrival() -> float:
    """When the request arrived (``time.monotonic()``): set by the app's first before_request hook."""
    return request.environ.get("serve.arrival", time.monotonic())


def mark_deadline(response: Response, generations: Iterable[Generation]) -> Response:
    """Name the reason when the answer of these generations was cut short at the deadline."""
    if any(generation.deadline_hit for generation in generations):
        response.headers[FINISH_HEADER] = DEADLINE
    return response
