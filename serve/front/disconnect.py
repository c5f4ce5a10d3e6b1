"""Cancel the work of clients that hung up, even while nothing is written to them.

A stream notices a gone client only when its next write fails, and a non-streaming request never does. So while
the engine holds a request, one thread peeks at its client socket (gunicorn passes it as ``gunicorn.socket``) every
``interval`` seconds: a reset cancels the request, whether it waits for a slot or runs. A FIN alone may be a
half-close (the client shut its write side and still reads), so it is probed first (see ``probe``).
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
from typing import Callable, Optional

log = logging.getLogger(__name__)

GONE = select.POLLHUP | select.POLLERR | select.POLLNVAL
OPEN, HALF_CLOSED, CLOSED = "open", "half-closed", "closed"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"  # an interim response every HTTP/1.1 client must accept


def client_state(sock: socket.socket) -> str:
    """``closed`` when the connection was reset (or is gone), ``half-closed`` when the peer sent FIN, else ``open``.

    A FIN alone is not a hang-up: a client may shut its write side after the request and still read the answer.
    Readiness is polled first, so a socket with a timeout never blocks the check.
    """
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | GONE)
        events = poller.poll(0)
        if not events:
            return OPEN
        if events[0][1] & GONE:
            return CLOSED
        return HALF_CLOSED if sock.recv(1, socket.MSG_PEEK) == b"" else OPEN
    except (BlockingIOError, InterruptedError):
        return OPEN
    except (OSError, ValueError):  # reset, or already closed
        return CLOSED


def client_gone(sock: socket.socket) -> bool:
    """True when the peer reset or closed the connection for good (a half-close is not that)."""
    return client_state(sock) == CLOSED


class ResponseState:
    """One HTTP request's side of the probe: has its response begun (then only the response itself may write)?"""

    def __init__(self, http11: bool):
        self.lock = threading.Lock()
        self.started = False
        self.http11 = http11
        self.probed = False


class ClientConnection:
    """The HTTP client of one request: its socket (None when the server is not gunicorn), its response's state, and
    the engine requests that watch it (unwatched once the response is sent)."""

    def __init__(self, sock: Optional[socket.socket], http11: bool):
        self.sock = sock
        self.state = ResponseState(http11)
        self.watched: list[str] = []

    def response_begins(self) -> list[str]:
        """From here only the response writes (a probe must not); the engine requests that watched this client."""
        with self.state.lock:
            self.state.started = True
        return list(self.watched)


class _Watch:
    def __init__(self, sock: socket.socket, state: ResponseState, poke: Callable[[], None]):
        self.sock, self.state, self.poke = sock, state, poke


def probe(watch: _Watch) -> None:
    """After a FIN, make the connection show whether the client still listens: a write to a client that closed
    its socket for good comes back as a reset (then the next check cancels), one that only half-closed reads on.

    Before the response begins, the write is an interim ``100 Continue`` (HTTP/1.1 only); a streaming response is
    asked to send an SSE keep-alive comment instead (``poke``), as only its own thread may write to it.
    """
    state = watch.state
    with state.lock:
        if state.probed:
            return
        state.probed = True
        if not state.started and state.http11:
            try:
                watch.sock.send(CONTINUE, socket.MSG_DONTWAIT)
            except OSError:
                pass
        elif state.started:
            watch.poke()


class DisconnectWatcher:
    """Watches the client sockets of requests the engine holds; calls ``cancel(request_id)`` when one closes."""

    def __init__(self, cancel: Callable[[str], None], interval: float = 0.1):
        self._cancel = cancel
        self._interval = interval
        self._watched: dict[str, _Watch] = {}
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def watch(
        self,
        request_id: str,
        sock: socket.socket,
        state: Optional[ResponseState] = None,
        poke: Callable[[], None] = lambda: None,
    ) -> None:
        log.debug("watching the client of request %s", request_id)
        with self._lock:
            self._watched[request_id] = _Watch(sock, state or ResponseState(http11=False), poke)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="disconnect-watcher", daemon=True)
                self._thread.start()

    def watch_client(self, request_id: str, client: ClientConnection, sink: Optional[queue.Queue] = None) -> None:
        """Watch ``client`` (when it has a socket) for engine request ``request_id``; a probe of a streaming response
        puts a keep-alive marker into ``sink``."""
        if client.sock is None:
            return
        poke = (lambda: sink.put((-1, None))) if sink is not None else (lambda: None)  # a keep-alive, now
        self.watch(request_id, client.sock, client.state, poke)
        client.watched.append(request_id)

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
                states = {request_id: (watch, client_state(watch.sock)) for request_id, watch in self._watched.items()}
                gone = [request_id for request_id, (_, state) in states.items() if state == CLOSED]
                for request_id in gone:
                    del self._watched[request_id]
            for watch, state in states.values():
                if state == HALF_CLOSED:
                    probe(watch)
            for request_id in gone:
                log.info("client of request %s disconnected; cancelling it", request_id)
                self._cancel(request_id)
