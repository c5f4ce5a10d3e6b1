"""The hardening parts on their own: the drain, the disconnect check and watcher, the OpenAPI builder."""

from __future__ import annotations

import socket
import threading
import time

from serve.front.disconnect import DisconnectWatcher, client_gone
from serve.http.shutdown import Drain
from tests.helpers import wait_for


def test_drain_waits_for_in_flight_work_then_stops():
    in_flight = [2]
    stopped = threading.Event()
    drain = Drain(lambda: in_flight[0], graceful_timeout=25, poll_s=0.01)
    assert not drain.draining
    drain.begin(stopped.set)
    drain.begin(lambda: (_ for _ in ()).throw(AssertionError("begin is idempotent")))
    assert drain.draining and not stopped.wait(0.2)
    in_flight[0] = 0
    assert stopped.wait(5)


def test_drain_gives_up_at_its_deadline():
    stopped = threading.Event()
    drain = Drain(lambda: 1, graceful_timeout=4, poll_s=0.01)  # deadline: 4 - 3 = 1 s
    started = time.monotonic()
    drain.begin(stopped.set)
    assert stopped.wait(10) and time.monotonic() - started >= 1.0


def test_client_gone_sees_close_and_reset_but_not_data_or_silence():
    a, b = socket.socketpair()
    a.settimeout(30)  # a socket with a timeout must not block the check
    started = time.monotonic()
    assert not client_gone(a) and time.monotonic() - started < 1
    b.sendall(b"GET / HTTP/1.1\r\n\r\n")  # a pipelined request is not a hang-up, and is left unread
    assert not client_gone(a) and a.recv(3) == b"GET"
    b.close()
    a.recv(100)
    assert client_gone(a)
    a.close()
    assert client_gone(a)


def test_watcher_cancels_the_request_of_a_closed_socket_only():
    cancelled: list[str] = []
    watcher = DisconnectWatcher(cancelled.append, interval=0.01)
    left, left_peer = socket.socketpair()
    stays, stays_peer = socket.socketpair()
    watcher.watch("left", left)
    watcher.watch("stays", stays)
    left_peer.close()
    assert wait_for(lambda: cancelled == ["left"], timeout=2)
    watcher.unwatch("stays")
    stays_peer.close()
    time.sleep(0.1)
    assert cancelled == ["left"] and watcher.watching == 0
