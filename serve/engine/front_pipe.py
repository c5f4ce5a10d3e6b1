"""The front's pieces around one engine process's pipe: ``PipeWriter`` sends, ``FrontStream`` holds the events of
one request that came back (``serve.engine.process.EngineProcess`` joins them)."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any, Callable, Iterator, Optional

from serve.engine.types import Request, TokenEvent

log = logging.getLogger(__name__)


class PipeWriter:
    """Sends to the engine process from a thread of its own, in order: a frozen engine (whose pipe fills up) never
    blocks the HTTP thread that submits or cancels; ``send`` is False once the pipe broke or was closed."""

    def __init__(self, conn: Any):
        self._conn = conn
        self._outgoing: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._open = True
        threading.Thread(target=self._run, name="engine-process-writer", daemon=True).start()

    def send(self, message: Any) -> bool:
        if self._open:
            self._outgoing.put(message)
        return self._open

    def close(self) -> None:
        """Send what is queued, then end the thread and close this end of the pipe."""
        self._open = False
        self._outgoing.put(None)

    def _run(self) -> None:
        while (message := self._outgoing.get()) is not None:
            try:
                self._conn.send(message)
            except (OSError, ValueError):
                self._open = False  # the engine process is gone: its reader fails what was in flight
                return
            except Exception:  # noqa: BLE001 - one message that cannot be sent; the others still go
                log.exception("a message to the engine process could not be sent: %r", message)
        self._conn.close()


class FrontStream:
    """The events of one request sent to an engine process, in order; closing it early cancels the request.

    Several streams may share one ``sink`` queue (the n choices of one client request); each puts
    ``(index, event)`` pairs into it, and the reader of the sink tells them apart by index.
    """

    def __init__(self, request: Request, cancel: Callable[[str], None], sink: Optional[queue.Queue], index: int):
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
