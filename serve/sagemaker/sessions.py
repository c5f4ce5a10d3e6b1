"""SageMaker stateful sessions: ids handed out on NEW_SESSION, checked on every request, closed or expired.

A session is an id with an expiry time. Requests that carry a live id are served as usual, tagged with it
(``Request.session_id``) so the engine keeps that conversation's KV blocks pinned in its prefix cache; when the
session closes or expires, ``engine.close_session(id)`` unpins them. Ids that were closed or expired are
remembered (the most recent ``FORGET_AFTER``), so a client is told which of the two happened.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Callable, Optional

from serve.errors import BadRequest

log = logging.getLogger(__name__)

SESSION_HEADER = "X-Amzn-SageMaker-Session-Id"
NEW_SESSION_HEADER = "X-Amzn-SageMaker-New-Session-Id"
CLOSED_SESSION_HEADER = "X-Amzn-SageMaker-Closed-Session-Id"
NEW_SESSION, CLOSE = "NEW_SESSION", "CLOSE"
FORGET_AFTER = 10_000


class SessionStore:
    """Live sessions and their expiry; ``on_close(id)`` runs once for each session that closes or expires."""

    def __init__(self, expiration: float, on_close: Callable[[str], None], clock: Callable[[], float] = time.time):
        self.expiration = expiration
        self._on_close = on_close
        self._clock = clock
        self._live: dict[str, float] = {}  # id -> expiry (Unix time)
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()  # id -> "closed" | "expired"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_forever, name="session-expiry", daemon=True)

    def start(self) -> "SessionStore":
        """Expire sessions in the background too, so an idle session's blocks are unpinned on time."""
        self._sweeper.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def create(self) -> tuple[str, float]:
        """A new session id and its expiry (Unix time)."""
        self.sweep()
        session_id, expires = str(uuid.uuid4()), self._clock() + self.expiration
        with self._lock:
            self._live[session_id] = expires
        log.info("session %s created, expires %s", session_id, iso_time(expires))
        return session_id, expires

    def check(self, session_id: str) -> str:
        """The id when it names a live session; a 400 saying whether it is unknown, closed or expired."""
        self.sweep()
        with self._lock:
            if session_id in self._live:
                return session_id
            ended = self._ended.get(session_id)
        if ended is not None:
            raise BadRequest(
                f"{SESSION_HEADER}: session {session_id} is {ended}; start a new one with "
                '{"requestType": "NEW_SESSION"}',
                SESSION_HEADER,
            )
        raise BadRequest(f"{SESSION_HEADER}: session {session_id!r} is unknown to this instance", SESSION_HEADER)

    def close(self, session_id: str) -> None:
        """Close a live session (400 when it is not live)."""
        self.check(session_id)
        self._end([session_id], "closed")

    def sweep(self) -> None:
        """End every session whose time is up."""
        now = self._clock()
        with self._lock:
            expired = [session_id for session_id, expires in self._live.items() if expires <= now]
        if expired:
            self._end(expired, "expired")

    def _end(self, session_ids: list[str], how: str) -> None:
        ended = []
        with self._lock:
            for session_id in session_ids:
                if self._live.pop(session_id, None) is not None:
                    ended.append(session_id)
                    self._ended[session_id] = how
            while len(self._ended) > FORGET_AFTER:
                self._ended.popitem(last=False)
        for session_id in ended:
            log.info("session %s %s", session_id, how)
            self._on_close(session_id)

    def _sweep_forever(self) -> None:
        interval = max(0.2, min(5.0, self.expiration / 4))
        while not self._stop.wait(interval):
            try:
                self.sweep()
            except Exception:  # noqa: BLE001 - the sweeper must outlive a failing on_close
                log.exception("session expiry sweep failed")


def iso_time(unix: float) -> str:
    """ISO-8601 UTC to the second, as the session header carries it (``YYYY-MM-DDTHH:MM:SSZ``)."""
    return datetime.fromtimestamp(unix, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def session_request_type(payload: Optional[object]) -> Optional[str]:
    """NEW_SESSION or CLOSE for a session request, None for any other body; a 400 for a malformed one."""
    if not isinstance(payload, dict) or "requestType" not in payload:
        return None
    kind = payload["requestType"]
    if kind not in (NEW_SESSION, CLOSE):
        raise BadRequest(f"requestType: must be {NEW_SESSION!r} or {CLOSE!r}, not {kind!r}", "requestType")
    extra = sorted(key for key in payload if key != "requestType")
    if extra:
        raise BadRequest(
            f"requestType: a session request carries no other fields (got {', '.join(extra)})", "requestType"
        )
    return kind
