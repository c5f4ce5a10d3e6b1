"""One copy of the model, in an engine process of its own: the HTTP worker's threads and the engine's step stop
sharing one GIL.

``EngineProcess`` is the front's handle on one copy (what ``EnginePool`` needs of one); a spawned child runs the
real ``Engine`` through ``serve.engine.host.host_engine``. They talk over one duplex pipe, in the typed messages of
``serve.engine.protocol``; this side decodes what arrives in one place (``_handlers``, on its one reader thread).

The front counts its own requests in flight (a request leaves the count when its final event arrives), so the
pool's admission cap, its choice of copy and the shutdown drain never wait on the child. Torch is imported by the
child only; the child exits when the pipe closes, so a worker that dies leaves no engine behind.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Optional

from serve.engine.adapters import AdapterError
from serve.engine.engine import EngineNotReady
from serve.engine.protocol import (
    CallDone,
    Cancel,
    CloseSession,
    Events,
    Failed,
    InstallAdapter,
    ModelCard,
    Ready,
    RetireAdapter,
    Snapshot,
    Stop,
    Submit,
    ToCore,
    dispatch,
)
from serve.engine.types import EngineConfig, EngineLoad, EngineStats, FinishReason, Limits, Request, TokenEvent

log = logging.getLogger(__name__)


class EngineProcessError(RuntimeError):
    """The engine process failed to load its model, or exited while serving."""


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


class EngineProcess:
    """An engine in a spawned child process; ``target(conn, *args)`` runs there and ends in ``host_engine``."""

    def __init__(self, target: Callable[..., None], args: tuple, config: EngineConfig = EngineConfig()):
        self.config = config
        self.load_error: Optional[BaseException] = None
        self.loaded: Optional[ModelCard] = None
        self.limits: Optional[Limits] = None
        self.eos_ids: frozenset[int] = frozenset()
        self._load_report: Optional[EngineLoad] = None
        self._target, self._args = target, args
        self._process: Optional[multiprocessing.process.BaseProcess] = None
        self._conn: Any = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # the streams and calls in flight
        self._streams: dict[int, FrontStream] = {}
        self._calls: dict[int, Future] = {}
        self._keys = itertools.count()
        self._snapshot = Snapshot()
        self._served = 0
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)
        self._handlers: dict[type, Callable[[Any], None]] = {
            Events: self._on_events,
            Ready: self._on_ready,
            CallDone: self._on_call_done,
            Failed: self._on_failed,
        }

    def start(self) -> "EngineProcess":
        """Spawn the engine process (idempotent); it loads the model and reports ready or failed."""
        if self._process is None:
            context = multiprocessing.get_context("spawn")  # never fork a threaded worker (nor CUDA state)
            self._conn, child_end = context.Pipe(duplex=True)
            self._process = context.Process(
                target=self._target, args=(child_end, *self._args), name="engine", daemon=True
            )
            self._process.start()
            child_end.close()
            self._reader.start()
            atexit.register(self.stop)  # before multiprocessing's own exit hook SIGTERMs it: a clean, quiet stop
        return self

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping.is_set() and self.load_error is None

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    @property
    def served(self) -> int:
        return self._served

    @property
    def waiting(self) -> int:
        return self._snapshot.waiting

    @property
    def running(self) -> int:
        return self._snapshot.running

    def stats(self) -> EngineStats:
        return self._snapshot.stats

    def describe(self) -> list[EngineLoad]:
        report = self._load_report
        graphs, compiled = (report.graphs, report.compiled) if report is not None else (None, None)
        return [EngineLoad(self.in_flight, self._served, graphs, compiled)]

    def submit(self, request: Request, sink: Optional[queue.Queue] = None, index: int = 0) -> FrontStream:
        """Send a request to the engine process (the pool decided it may run); EngineNotReady when it cannot."""
        if not self.ready:
            raise EngineNotReady.because(self.load_error)
        stream = FrontStream(request, self.cancel, sink, index)
        with self._lock:
            key = next(self._keys)
            self._streams[key] = stream
            self._served += 1
        self._send(Submit(key, request))
        return stream

    def cancel(self, request_id: str) -> None:
        self._send(Cancel(request_id))

    def close_session(self, session_id: str) -> None:
        self._send(CloseSession(session_id))

    def install_adapter(self, name: str, number: int, folder: str, max_rank: Optional[int] = None) -> Future:
        """The engine process reads, prepares and links the adapter; the future resolves once requests may use it
        (AdapterError when the folder cannot be served)."""
        return self._call(lambda call: InstallAdapter(call, name, number, folder, max_rank))

    def retire_adapter(self, name: str) -> Future:
        """Sent in order with the submits: the future resolves once the adapter's last request has finished."""
        return self._call(lambda call: RetireAdapter(call, name))

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the engine process to stop; past ``timeout`` it is terminated."""
        if self._stopping.is_set() and not self._reader.is_alive():
            return  # stopped already
        self._stopping.set()
        if self._process is None:
            return
        self._send(Stop())
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(2.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._reader.join(1.0)

    def _call(self, message: Callable[[int], ToCore]) -> Future:
        done: Future = Future()
        with self._lock:
            call = next(self._keys)
            self._calls[call] = done
        if not self._send(message(call)):
            self._calls.pop(call, None)
            done.set_exception(EngineProcessError("the engine process is not running"))
        return done

    def _send(self, message: ToCore) -> bool:
        """Send to the engine process; False when it is gone (the reader fails what was in flight)."""
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, ValueError, AttributeError):
            return False

    def _read(self) -> None:
        """The front's one reader: decodes every message from the engine process."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            dispatch(message, self._handlers, "front")
        self._on_exit()

    def _on_events(self, message: Events) -> None:
        for key, event in message.events:
            if event.finish_reason is None:
                stream = self._streams.get(key)
            else:
                with self._lock:
                    stream = self._streams.pop(key, None)
            if stream is not None:
                stream.put(event)
        self._snapshot = message.snapshot

    def _on_ready(self, message: Ready) -> None:
        self.loaded, self.limits, self.eos_ids = message.model, message.limits, message.eos_ids
        self._load_report = message.load
        self._ready.set()

    def _on_call_done(self, message: CallDone) -> None:
        with self._lock:
            done = self._calls.pop(message.call, None)
        if done is None:
            return
        if message.error is None:
            done.set_result(None)
        else:
            done.set_exception((AdapterError if message.refused else EngineProcessError)(message.error))

    def _on_failed(self, message: Failed) -> None:
        self.load_error = EngineProcessError(message.reason)
        self._send(Stop())  # nothing more to do there

    def _on_exit(self) -> None:
        """The pipe closed: fail what was in flight, and stop serving if the process died unasked."""
        code = self._process.exitcode if self._process is not None else None
        if self._process is not None and code is None:
            self._process.join(1.0)
            code = self._process.exitcode
        if not self._stopping.is_set() and self.load_error is None:
            self.load_error = EngineProcessError(f"the engine process exited (code {code})")
            log.critical("%s; this worker no longer serves", self.load_error)
        with self._lock:
            streams, self._streams = self._streams, {}
            calls, self._calls = self._calls, {}
        reason = str(self.load_error or "the engine stopped")
        for stream in streams.values():
            stream.put(TokenEvent.ending(stream.request, FinishReason.ERROR, reason))
        for done in calls.values():
            done.set_exception(EngineProcessError(reason))
