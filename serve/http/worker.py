"""A gthread worker that reads each request's head, and a body of known length, on its event loop, not in a thread.

gunicorn's gthread worker hands a connection to a pool thread that then reads the request line and headers from a
blocking socket: a client that sends its headers slowly (slowloris) holds that thread for as long as it likes, and
a few hundred of them leave none for ``/ping``. Here the worker's poller gathers the bytes of every connection
without blocking; a thread is given a connection only once its head (and a ``Content-Length`` body up to
``BODY_BUFFER_MAX``) is complete. A connection that has not delivered its head within ``HEAD_TIMEOUT_S`` (or its
body within ``BODY_TIMEOUT_S``) gets a 408 and is closed. Idle connections cost a file descriptor, not a thread:
``worker_connections`` is raised (and the open-file limit with it). Buffered bytes are bounded in all
(``BUFFER_BUDGET``); past it, bodies are read by the threads, as gthread does.
"""

from __future__ import annotations

import errno
import io
import re
import resource
import selectors
import socket
import time
from functools import partial
from typing import Optional

from gunicorn.workers.gthread import TConn, ThreadWorker

HEAD_TIMEOUT_S = 10.0  # from accept (or from the first byte of a kept-alive connection's next request)
BODY_TIMEOUT_S = 60.0  # SageMaker's invocation limit
MAX_HEAD_BYTES = 32 * 1024  # past this the head goes to gunicorn's parser, which refuses it (431/400)
BODY_BUFFER_MAX = 6 * 1024 * 1024 + 64 * 1024  # bodies above the 6 MiB payload limit are refused by the app (413)
BUFFER_BUDGET = 256 * 1024 * 1024  # bytes held for all connections together; past it, threads read bodies (gthread)
RECV_BYTES = 256 * 1024
TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,12})[ \t]*\r\n", re.IGNORECASE)
NOT_BUFFERED = re.compile(rb"\r\n(transfer-encoding|expect):", re.IGNORECASE)  # chunked bodies, 100-continue


def head_complete(data: bytes, buffer_bodies: bool = True) -> Optional[int]:
    """How many bytes of ``data`` a thread needs before it starts: the head plus a known-length body; None if more."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return len(data) if len(data) > MAX_HEAD_BYTES else None
    head = data[: end + 2]
    match = CONTENT_LENGTH.search(head)
    if match is None or NOT_BUFFERED.search(head) or not buffer_bodies:
        return end + 4
    length = int(match.group(1))
    if length > BODY_BUFFER_MAX:
        return end + 4  # the app answers 413 from the header alone
    return end + 4 + length if len(data) >= end + 4 + length else None


class BufferingWorker(ThreadWorker):
    """gthread, except that request heads are read by the event loop (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reading: dict[TConn, float] = {}  # connection -> deadline of what it is sending
        self.buffered = 0  # bytes held in ``received`` of the connections being read

    def init_process(self) -> None:
        """Idle connections cost a descriptor each: raise the soft open-file limit to the hard one."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
            except (ValueError, OSError):
                pass
        super().init_process()

    def accept(self, listener: socket.socket) -> None:
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._read_head(TConn(self.cfg, client, address, listener.getsockname()))  # TConn makes it non-blocking

    def on_client_socket_readable(self, conn: TConn, client: socket.socket) -> None:
        """A kept-alive connection's next request: its head is read by the event loop too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._read_head(conn)

    def _read_head(self, conn: TConn) -> None:
        conn.received = bytearray()
        conn.sock.setblocking(False)
        self.reading[conn] = time.monotonic() + HEAD_TIMEOUT_S
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_bytes, conn))

    def _on_bytes(self, conn: TConn, client: socket.socket) -> None:
        try:
            data = client.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # closed before a whole request arrived
            self._drop(conn)
            return
        had_head = b"\r\n\r\n" in conn.received
        conn.received += data
        self.buffered += len(data)
        if head_complete(bytes(conn.received), self.buffered <= BUFFER_BUDGET) is not None:
            self._stop_reading(conn)
            conn.data_ready = True
            self.enqueue_req(conn)
        elif not had_head and b"\r\n\r\n" in conn.received:
            self.reading[conn] = time.monotonic() + BODY_TIMEOUT_S

    def handle(self, conn: TConn):
        """In the pool thread: what the event loop read goes back in front of the socket, then gthread's handling."""
        received = getattr(conn, "received", None)
        if received:
            conn.received = None
            conn.sock.setblocking(True)
            conn.init()
            buffer = conn.parser.unreader.buf
            buffer.seek(0, io.SEEK_END)
            buffer.write(bytes(received))
        return super().handle(conn)

    def murder_pending(self) -> None:
        """Besides gthread's own: connections past their head or body deadline get a 408 and are closed."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [conn for conn, deadline in self.reading.items() if deadline <= now or not self.alive]:
            try:
                conn.sock.send(TIMEOUT_RESPONSE)
            except OSError:
                pass
            self._drop(conn)

    def murder_keepalived(self, force: bool = False) -> None:
        super().murder_keepalived(force)
        if not self.alive:  # stopping: a request still arriving will not be served
            self.murder_pending()

    def _stop_reading(self, conn: TConn) -> None:
        if self.reading.pop(conn, None) is not None:
            self.buffered -= len(conn.received or b"")
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _drop(self, conn: TConn) -> None:
        self._stop_reading(conn)
        self.nr_conns -= 1
        conn.close()
