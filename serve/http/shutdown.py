"""Graceful shutdown of a worker: on SIGTERM refuse new work with 503, let admitted requests finish, then stop.

gunicorn's own SIGTERM handling stops accepting connections at once. We defer it: the worker keeps answering
(``/ping`` and new requests get 503, on new and kept-alive connections alike, as the worker still holds the
listening socket the master closed) until the engine has no request in flight or the drain deadline passes;
then gunicorn's graceful stop runs as usual. ``container/gunicorn.conf.py`` wires SIGTERM to ``Drain.begin``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)

STOP_MARGIN_S = 3.0
# After the deadline: time for cut responses to send their error event before gunicorn's own stop (which lingers
# 2 s on kept-alive connections) and before the SIGKILL.
CUT_WAIT_S = 1.0
ENGINE_STOP_S = 0.5  # after the drain: how long an engine process may take to stop before it is killed


class Drain:
    """The worker's shutdown state: ``draining`` once SIGTERM arrived; ``then`` runs when the work is done."""

    def __init__(
        self,
        in_flight: Callable[[], int],
        graceful_timeout: float,
        poll_s: float = 0.05,
        cut: Callable[[], int] = lambda: 0,
    ):
        self._in_flight = in_flight
        self._cut = cut  # ends what is still in flight at the deadline (in-band error events); returns how many
        self.deadline_s = max(graceful_timeout - STOP_MARGIN_S - CUT_WAIT_S, 1.0)
        self._poll_s = poll_s
        self._started = threading.Event()

    @property
    def draining(self) -> bool:
        return self._started.is_set()

    def begin(self, then: Callable[[], None]) -> None:
        """Start draining (idempotent); ``then`` is called from a helper thread once nothing is in flight."""
        if self._started.is_set():
            return
        self._started.set()
        threading.Thread(target=self._wait_then, args=(then,), name="drain", daemon=True).start()

    def _wait_then(self, then: Callable[[], None]) -> None:
        started = time.monotonic()
        log.info(
            "SIGTERM: draining; %d request(s) in flight, new ones get 503 (deadline %.0f s)",
            self._in_flight(),
            self.deadline_s,
        )
        while self._in_flight() > 0 and time.monotonic() - started < self.deadline_s:
            time.sleep(self._poll_s)
        left = self._in_flight()
        if left:
            cut = self._cut()
            log.warning(
                "drain deadline reached with %d request(s) still in flight; cut %d response(s) with an "
                "in-band error saying the server is shutting down",
                left,
                cut,
            )
            ended = time.monotonic()
            while self._in_flight() > 0 and time.monotonic() - ended < CUT_WAIT_S:  # let the error events go out
                time.sleep(self._poll_s)
        else:
            log.info("drained in %.1f s; stopping the worker", time.monotonic() - started)
        then()


def stopping_engine(engine: Any, then: Callable[[], None]) -> Callable[[], None]:
    """What runs once the drain is over: stop the engine processes (a SIGTERM to the whole process group reached
    them too, and they ignore it: the worker stops them once its requests are done), then ``then``."""

    def stop() -> None:
        try:
            engine.stop(ENGINE_STOP_S)
        finally:
            then()

    return stop
