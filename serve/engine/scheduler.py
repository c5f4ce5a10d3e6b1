"""Admission control and the waiting queue: who may enter, who runs next, who was cancelled."""

from __future__ import annotations

import collections
import threading
from typing import Optional

from serve.engine.types import Request


class EngineOverloaded(RuntimeError):
    """More requests than the admission cap are in flight."""


class Scheduler:
    """FIFO of admitted requests, capped at ``max_in_flight`` (waiting + running) at any time."""

    def __init__(self, max_in_flight: int):
        self.max_in_flight = max_in_flight
        self._waiting: collections.deque[Request] = collections.deque()
        self._in_flight: set[str] = set()
        self._cancelled: set[str] = set()
        self._condition = threading.Condition()

    def admit(self, request: Request) -> None:
        """Queue a request, or raise EngineOverloaded when the cap is reached."""
        with self._condition:
            if len(self._in_flight) >= self.max_in_flight:
                raise EngineOverloaded(
                    f"{len(self._in_flight)} requests in flight, the limit is {self.max_in_flight}; retry later"
                )
            self._in_flight.add(request.id)
            self._waiting.append(request)
            self._condition.notify()

    def next_request(self, timeout: float) -> Optional[Request]:
        """The oldest waiting request, waiting up to ``timeout`` seconds for one."""
        with self._condition:
            if not self._waiting:
                self._condition.wait(timeout)
            return self._waiting.popleft() if self._waiting else None

    def cancel(self, request_id: str) -> None:
        """Mark a request cancelled; the engine drops it at its next step."""
        with self._condition:
            if request_id in self._in_flight:
                self._cancelled.add(request_id)

    def is_cancelled(self, request_id: str) -> bool:
        with self._condition:
            return request_id in self._cancelled

    def finish(self, request_id: str) -> None:
        """Free the request's admission slot."""
        with self._condition:
            self._in_flight.discard(request_id)
            self._cancelled.discard(request_id)

    @property
    def in_flight(self) -> int:
        with self._condition:
            return len(self._in_flight)

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._waiting)
