"""Cancel the work of clients that hung up, even while nothing is written to them.

A stream notices a gone client only when its next write fails, and a non-streaming request never does. So while
the engine holds a request, one thread peeks at its client socket (gunicorn passes it as ``gunicorn.socket``) every
``interval`` seconds: an orderly close or a reset cancels the request, whether it waits for a slot or runs.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from typing import Any, Callable, Optional

from flask import Response, g, has_request_context, request

log = logging.getLogger(__name__)

GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL


def client_gone(sock: socket.socket) -> bool:
    """True when the peer closed or reset the connection (data it sent, such as a pipelined request, is left unread).

    Readiness is polled first, so a socket with a timeout never blocks the check.
    """
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | GONE)
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & GONE:
            return True
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):  # reset, or already closed
        return True


class DisconnectWatcher:
    """Watches the client sockets of requests the engine holds; calls ``cancel(request_id)`` when one closes."""

    def __init__(self, cancel: Callable[[str], None], interval: float = 0.1):
        self._cancel = cancel
        self._interval = interval
        self._watched: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def watch(self, request_id: str, sock: socket.socket) -> None:
        log.debug("watching the client of request %s", request_id)
        with self._lock:
            self._watched[request_id] = sock
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="disconnect-watcher", daemon=True)
                self._thread.start()

    def unwatch(self, request_id: str) -> None:
        with self._lock:
            self._watched.pop(request_id, None)

    @property
    def watching(self) -> int:
        with self._lock:
            return len(self._watched)

    def _run(self) -> None:
        while True:
            time.sleep(self._interval)
            with self._lock:
                gone = [request_id for request_id, sock in self._watched.items() if client_gone(sock)]
                for request_id in gone:
                    del self._watched[request_id]
            for request_id in gone:
                log.info("client of request %s disconnected; cancelling it", request_id)
                self._cancel(request_id)


class WatchedEngine:
    """The engine as routes see it: ``submit`` also watches the current request's client socket; all else delegates."""

    def __init__(self, engine: Any, watcher: DisconnectWatcher):
        self._engine = engine
        self._watcher = watcher

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # isinstance() checks (an engine or a pool?) see the wrapped engine
        return type(self._engine)

    def submit(self, engine_request: Any, *args: Any, **kwargs: Any) -> Any:
        stream = self._engine.submit(engine_request, *args, **kwargs)
        sock = request.environ.get("gunicorn.socket") if has_request_context() else None
        if isinstance(sock, socket.socket):
            self._watcher.watch(engine_request.id, sock)
            g.setdefault("serve_watched", []).append(engine_request.id)
        return stream


def unwatch_when_sent(watcher: DisconnectWatcher) -> Callable[[Response], Response]:
    """An after_request handler: once the response is sent (a stream to its end) or abandoned, stop watching its socket.

    Not a teardown handler: for a streamed response Flask tears the request down as soon as the view returns.
    """

    def after(response: Response) -> Response:
        request_ids = g.pop("serve_watched", [])
        if request_ids:
            response.call_on_close(lambda: [watcher.unwatch(request_id) for request_id in request_ids])
        return response

    return after
