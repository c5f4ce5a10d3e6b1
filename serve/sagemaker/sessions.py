"""SageMaker stateful sessions: ids handed out on NEW_SESSION, checked on every request, closed or expired.

A session is an id with an expiry time. Requests that carry a live id are served as usual, tagged with it
(``Request.session_id``) so the engine keeps that conversation's KV blocks pinned in its prefix cache; when the
session closes or expires, ``engine.close_session(id)`` unpins them. Ids that were closed or expired are
remembered (the most recent ``FORGET_AFTER``), so a client is told which of the two happened.

At most ``max_sessions`` (``MAX_SESSIONS``) live at once: a new session past the cap expires the one idle longest
(no request in flight, least recently used); when every live session has a request in flight it is a 429.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

from serve.errors import BadRequest, Overloaded

log = logging.getLogger(__name__)

SESSION_HEADER = "X-Amzn-SageMaker-Session-Id"
NEW_SESSION_HEADER = "X-Amzn-SageMaker-New-Session-Id"
CLOSED_SESSION_HEADER = "X-Amzn-SageMaker-Closed-Session-Id"
NEW_SESSION, CLOSE = "NEW_SESSION", "CLOSE"
FORGET_AFTER = 10_000
MAX_SESSIONS = 1024


@dataclass
class LiveSession:
    expires: float  # Unix time
    in_flight: int = 0  # requests of the session not answered yet


class SessionStore:
    """Live sessions and their expiry; ``on_close(id)`` runs once for each session that closes or expires."""

    def __init__(
        self,
        expiration: float,
        on_close: Callable[[str], None],
        clock: Callable[[], float] = time.time,
        max_sessions: int = MAX_SESSIONS,
    ):
        self.expiration = expiration
        self.max_sessions = max_sessions
        self._on_close = on_close
        self._clock = clock
        self._live: collections.OrderedDict[str, LiveSession] = collections.OrderedDict()  # least recently used first
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
        """A new session id and its expiry (Unix time); past ``max_sessions`` the session idle longest expires to
        make room, and when none is idle it is a 429."""
        self.sweep()
        session_id, expires = str(uuid.uuid4()), self._clock() + self.expiration
        with self._lock:
            idle = self._idle_longest() if len(self._live) >= self.max_sessions else None
            if idle is not None:
                self._end_locked([idle], "expired")
            if len(self._live) >= self.max_sessions:
                raise Overloaded(
                    f"requestType: MAX_SESSIONS={self.max_sessions} sessions are live, each with a request in flight; "
                    'close one with {"requestType": "CLOSE"} or retry later',
                    "requestType",
                )
            self._live[session_id] = LiveSession(expires)
        if idle is not None:
            self._announce([idle], "expired (MAX_SESSIONS reached; it was idle longest)")
        log.info("session %s created, expires %s", session_id, iso_time(expires))
        return session_id, expires

    def _idle_longest(self) -> Optional[str]:
        """The live session with no request in flight that was used least recently (the lock is held)."""
        return next((session_id for session_id, live in self._live.items() if not live.in_flight), None)

    def check(self, session_id: str) -> str:
        """The id when it names a live session; a 400 saying whether it is unknown, closed or expired."""
        return self._use(session_id, 0)

    def begin(self, session_id: str) -> str:
        """``check``, and count one more request in flight on the session (``finish`` when it is answered): a
        session with a request in flight is never expired to make room for a new one."""
        return self._use(session_id, 1)

    def _use(self, session_id: str, requests: int) -> str:
        """Mark a live session used now, with ``requests`` more in flight; a 400 for one not live."""
        self.sweep()
        with self._lock:
            live = self._live.get(session_id)
            if live is not None:
                live.in_flight += requests
                self._live.move_to_end(session_id)
                return session_id
            ended = self._ended.get(session_id)
        if ended is not None:
            raise BadRequest(
                f"{SESSION_HEADER}: session {session_id} is {ended}; start a new one with "
                '{"requestType": "NEW_SESSION"}',
                SESSION_HEADER,
            )
        raise BadRequest(f"{SESSION_HEADER}: session {session_id!r} is unknown to this instance", SESSION_HEADER)

    def finish(self, session_id: str) -> None:
        """One request of the session was answered (the session may have ended meanwhile)."""
        with self._lock:
            live = self._live.get(session_id)
            if live is not None:
                live.in_flight = max(0, live.in_flight - 1)
                self._live.move_to_end(session_id)

    @property
    def live(self) -> int:
        with self._lock:
            return len(self._live)

    def close(self, session_id: str) -> None:
        """Close a live session (400 when it is not live)."""
        self.check(session_id)
        self._end([session_id], "closed")

    def sweep(self) -> None:
        """End every session whose time is up."""
        now = self._clock()
        with self._lock:
            expired = [session_id for session_id, live in self._live.items() if live.expires <= now]
        if expired:
            self._end(expired, "expired")

    def _end(self, session_ids: list[str], how: str) -> None:
        with self._lock:
            ended = self._end_locked(session_ids, how)
        self._announce(ended, how)

    def _end_locked(self, session_ids: list[str], how: str) -> list[str]:
        """Forget live sessions (the lock is held); returns those that were live."""
        ended = []
        for session_id in session_ids:
            if self._live.pop(session_id, None) is not None:
                ended.append(session_id)
                self._ended[session_id] = how
        while len(self._ended) > FORGET_AFTER:
            self._ended.popitem(last=False)
        return ended

    def _announce(self, session_ids: list[str], how: str) -> None:
        """Log each ended session and tell the engine to unpin its blocks."""
        for session_id in session_ids:
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
