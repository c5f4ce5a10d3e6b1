"""The front's writer to one engine process's pipe: ``PipeWriter`` sends without ever blocking the caller
(``serve.engine.process.EngineProcess`` reads the replies)."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any


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
