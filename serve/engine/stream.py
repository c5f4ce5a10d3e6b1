"""One request's stream of events, the same on both sides of the engine process's pipe."""

from __future__ import annotations

import queue
from typing import Callable, Iterator, Optional

from serve.engine.types import Request, TokenEvent


class RequestStream:
    """The events of one request, in order; closing it early cancels the request (through ``cancel``, the engine's or
    the engine process client's).

    Several streams may share one ``sink`` queue (the n choices of one client request); each puts
    ``(index, event)`` pairs into it, and the reader of the sink tells them apart by index.
    """

    def __init__(
        self, request: Request, cancel: Callable[[str], None], sink: Optional[queue.Queue] = None, index: int = 0
    ):
        self.request = request
        self.index = index
        self._cancel = cancel
        self._events: "queue.Queue[tuple[int, TokenEvent]]" = queue.Queue() if sink is None else sink
        self._finished = False

    def put(self, event: TokenEvent) -> None:
        self._events.put((self.index, event))

    def events(self, heartbeat: Optional[float] = None) -> Iterator[Optional[TokenEvent]]:
        """Yield events until the final one; yield None every ``heartbeat`` seconds of silence."""
        while not self._finished:
            try:
                _, event = self._events.get(timeout=heartbeat)
            except queue.Empty:
                yield None
                continue
            self._finished = event.finish_reason is not None
            yield event

    def __iter__(self) -> Iterator[TokenEvent]:
        return (event for event in self.events() if event is not None)

    def close(self) -> None:
        """Cancel the request if it has not finished (the client went away)."""
        if not self._finished:
            self._cancel(self.request.id)
