"""One copy of the model, in an engine process of its own: the HTTP worker's threads and the engine's step stop
sharing one GIL.

``EngineProcess`` is the front's handle on one copy (what ``EnginePool`` needs of one); a spawned child runs the
real ``Engine`` through ``serve.engine.host.host_engine``. They talk over one duplex pipe, in the typed messages of
``serve.engine.protocol``; this side decodes what arrives in one place (``_handlers``, on its one reader thread)
and sends from a writer thread (``serve.engine.front_pipe.PipeWriter``), so a frozen child never blocks a caller.

The front counts its own requests in flight (a request leaves the count when its final event arrives), so the
pool's admission cap, its choice of copy and the shutdown drain never wait on the child. Torch is imported by the
child only; the child exits when the pipe closes, so a worker that dies leaves no engine behind.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, Callable, ContextManager, Optional

from serve.engine.adapters import AdapterError
from serve.engine.engine import EngineNotReady
from serve.engine.front_pipe import PipeWriter
from serve.engine.stream import RequestStream
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
from serve.engine.recovery import counters_only
from serve.engine.types import EngineConfig, EngineLoad, EngineStats, FinishReason, Limits, Request, TokenEvent

log = logging.getLogger(__name__)


class EngineProcessError(RuntimeError):
    """The engine process failed to load its model, or exited while serving."""


class EngineProcess:
    """An engine in a spawned child process; ``target(conn, *args)`` runs there and ends in ``host_engine``.

    A child that dies while serving fails its requests and leaves ``exited`` set; ``restart`` spawns a fresh one
    (the owner, an ``EnginePool``, decides when). With ``stall_timeout_s``, a copy with requests in flight that made
    no engine step for that long is ``stalled`` and not ready until it moves again.
    """

    def __init__(
        self,
        target: Callable[..., None],
        args: tuple,
        config: EngineConfig = EngineConfig(),
        stall_timeout_s: float = 0.0,
        spawning: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
        daemon: bool = True,
    ):
        """``spawning``: the context the child is spawned in (the environment it copies: its visible GPUs);
        ``daemon``: False for a child that starts processes of its own (tensor-parallel ranks), which a daemonic
        process may not; it still ends when its pipe closes."""
        self.config = config
        self._spawning, self._daemon = spawning, daemon
        self.load_error: Optional[BaseException] = None
        self.exit_error: Optional[EngineProcessError] = None  # why the last child ended unasked
        self.loaded: Optional[ModelCard] = None
        self.limits: Optional[Limits] = None
        self.eos_ids: frozenset[int] = frozenset()
        self.restarts = 0
        self._stall_timeout_s = stall_timeout_s
        self._load_report: Optional[EngineLoad] = None
        self._target, self._args = target, args
        self._process: Optional[multiprocessing.process.BaseProcess] = None
        self._writer: Optional[PipeWriter] = None
        self._reader: Optional[threading.Thread] = None
        self._life_lock = threading.Lock()  # spawning and stopping
        self._lock = threading.Lock()  # the streams and calls in flight
        self._streams: dict[int, RequestStream] = {}
        self._calls: dict[int, Future] = {}
        self._adapters: dict[str, InstallAdapter] = {}  # installed: sent again to a restarted child
        self._keys = itertools.count()
        self._snapshot = Snapshot()
        self._earlier = EngineStats()  # the counters of children that died
        self._progress_at = time.monotonic()
        self._served = 0
        self._ready = threading.Event()
        self._exited = threading.Event()
        self._stopping = threading.Event()
        self._handlers: dict[type, Callable[[Any], None]] = {
            Events: self._on_events,
            Ready: self._on_ready,
            CallDone: self._on_call_done,
            Failed: self._on_failed,
        }

    def start(self) -> "EngineProcess":
        """Spawn the engine process (idempotent); it loads the model and reports ready or failed."""
        with self._life_lock:
            if self._process is None:
                self._spawn()
                atexit.register(self.stop)  # before multiprocessing's own exit hook: a clean, quiet stop
        return self

    def restart(self) -> bool:
        """Spawn a fresh engine process in place of one that exited (the model loads again from the prepared
        folder, the adapters it held are installed again); False when stopping or still running."""
        with self._life_lock:
            if self._stopping.is_set() or not self._exited.is_set():
                return False
            if self._reader is not None:
                self._reader.join(2.0)
            self._writer.close()
            self._earlier = self.stats()
            self._snapshot = Snapshot()
            self.load_error = None
            self._ready.clear()
            self._spawn()
            self.restarts += 1
            self._exited.clear()
        log.warning("engine process restarted (pid %s); the model is loading again", self.pid)
        return True

    def _spawn(self) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a threaded worker (nor CUDA state)
        conn, child_end = context.Pipe(duplex=True)
        process = context.Process(
            target=self._target, args=(child_end, *self._args), name="engine", daemon=self._daemon
        )
        with self._spawning():
            process.start()
        child_end.close()
        self._process, self._writer = process, PipeWriter(conn)
        self._reader = threading.Thread(
            target=self._read, args=(process, conn), name="engine-process-reader", daemon=True
        )
        self._reader.start()

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return (
            self._ready.is_set()
            and not self._exited.is_set()
            and not self._stopping.is_set()
            and self.load_error is None
            and not self.stalled
        )

    @property
    def exited(self) -> bool:
        """The engine process ended unasked (it crashed, or its load failed) and was not restarted yet."""
        return self._exited.is_set() and not self._stopping.is_set()

    @property
    def stalled(self) -> bool:
        """Requests are in flight and the engine made no step for ``stall_timeout_s`` seconds."""
        limit = self._stall_timeout_s
        return limit > 0 and bool(self._streams) and time.monotonic() - self._progress_at > limit

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
        """The child's counters, plus those of the children before it and the count of restarts."""
        return replace(self._snapshot.stats + counters_only(self._earlier), restarts=self.restarts)

    def describe(self) -> list[EngineLoad]:
        report = self._load_report
        if report is None:
            return [EngineLoad(self.in_flight, self._served)]
        return [
            EngineLoad(self.in_flight, self._served, report.graphs, report.compiled, report.attention, report.ahead)
        ]

    def submit(self, request: Request, sink: Optional[queue.Queue] = None, index: int = 0) -> RequestStream:
        """Send a request to the engine process (the pool decided it may run); EngineNotReady when it cannot."""
        if not self.ready:
            raise EngineNotReady.because(self.load_error)
        stream = RequestStream(request, self.cancel, sink, index)
        with self._lock:
            if self._exited.is_set():  # died since: its requests were failed already
                raise EngineNotReady(str(self.exit_error))
            if not self._streams:
                self._progress_at = time.monotonic()  # the stall clock starts with the work
            key = next(self._keys)
            self._streams[key] = stream
            self._served += 1
        self._send(Submit(key, request))
        return stream

    def cancel(self, request_id: str) -> None:
        self._send(Cancel(request_id))

    def close_session(self, session_id: str) -> None:
        self._send(CloseSession(session_id))

    def uses_adapter(self, name: str) -> bool:
        """True while a request sent on adapter ``name`` has not ended (the registry evicts only idle adapters)."""
        with self._lock:
            return any(stream.request.adapter == name for stream in self._streams.values())

    def install_adapter(self, name: str, number: int, folder: str, max_rank: Optional[int] = None) -> Future:
        """The engine process reads, prepares and links the adapter; the future resolves once requests may use it
        (AdapterError when the folder cannot be served)."""
        install = InstallAdapter(0, name, number, folder, max_rank)
        with self._lock:
            self._adapters[name] = install  # from now on, a restarted child installs it too
            live = self._ready.is_set() and not self._exited.is_set()
        if not live:  # dead or reloading: the next child installs it before it serves
            return _done()
        done = self._call(lambda call: replace(install, call=call))
        done.add_done_callback(lambda future: self._forget_if_failed(install, future))
        return done

    def retire_adapter(self, name: str) -> Future:
        """Sent in order with the submits: the future resolves once the adapter's last request has finished."""
        with self._lock:
            self._adapters.pop(name, None)
            if self._exited.is_set():  # the next child never hears of it
                return _done()
        return self._call(lambda call: RetireAdapter(call, name))

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the engine process to stop; past ``timeout`` it is killed (it ignores SIGTERM and SIGINT)."""
        with self._life_lock:
            if self._stopping.is_set() and (self._reader is None or not self._reader.is_alive()):
                return  # stopped already
            self._stopping.set()
            process = self._process
        if process is None:
            return
        self._send(Stop())
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
        if self._reader is not None:
            self._reader.join(1.0)
        self._writer.close()

    def _forget_if_failed(self, install: InstallAdapter, done: Future) -> None:
        with self._lock:
            if done.exception() is not None and self._adapters.get(install.name) is install:
                del self._adapters[install.name]

    def _call(self, message: Callable[[int], ToCore]) -> Future:
        done: Future = Future()
        with self._lock:
            call = next(self._keys)
            registered = not self._exited.is_set()  # else its reader has failed what was in flight already
            if registered:
                self._calls[call] = done
        if not registered or not self._send(message(call)):
            with self._lock:  # failed here unless the reader has failed it meanwhile
                ours = not registered or self._calls.pop(call, None) is not None
            if ours:
                done.set_exception(EngineProcessError("the engine process is not running"))
        return done

    def _send(self, message: ToCore) -> bool:
        """Queue for the engine process (never blocks); False when it is gone (the reader fails what was in
        flight)."""
        writer = self._writer
        return writer is not None and writer.send(message)

    def _read(self, process: multiprocessing.process.BaseProcess, conn: Any) -> None:
        """The front's one reader of one child: decodes every message from it, then handles its end."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            dispatch(message, self._handlers, "front")
        self._on_exit(process)

    def _on_events(self, message: Events) -> None:
        if message.events or message.snapshot.stats.steps != self._snapshot.stats.steps:
            self._progress_at = time.monotonic()
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
        self._install_held({})

    def _install_held(self, sent: dict[str, InstallAdapter]) -> None:
        """Install on a restarted child every adapter the front holds that it was not sent yet (registered while
        it was down, too); ready once there is none left."""
        with self._lock:
            missing = [install for name, install in self._adapters.items() if sent.get(name) is not install]
            if not missing:
                self._ready.set()
                return
        left = [len(missing)]

        def installed(install: InstallAdapter, done: Future) -> None:
            if done.exception() is not None:
                log.error("the restarted engine process could not install %r again: %s", install.name, done.exception())
            if isinstance(done.exception(), AdapterError):  # refused: forgotten (an ended child: kept for the next)
                self._forget_if_failed(install, done)
            left[0] -= 1
            if left[0] == 0 and not self._exited.is_set():
                self._install_held(sent)

        for install in missing:
            sent[install.name] = install
            done = self._call(lambda call, install=install: replace(install, call=call))
            done.add_done_callback(lambda future, install=install: installed(install, future))

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

    def _on_exit(self, process: multiprocessing.process.BaseProcess) -> None:
        """The pipe closed: fail what was in flight; a child that died unasked leaves ``exited`` set."""
        if process.exitcode is None:
            process.join(1.0)
        reason = "the engine stopped"
        if not self._stopping.is_set():
            loading = not self._ready.is_set()
            self.exit_error = EngineProcessError(f"the engine process exited (code {process.exitcode})")
            if loading and self.load_error is None:
                self.load_error = self.exit_error
            reason = str(self.load_error if loading else self.exit_error)
            log.error("%s (pid %s) %s", self.exit_error, process.pid, "while loading" if loading else "while serving")
        with self._lock:
            if not self._stopping.is_set():
                self._exited.set()
            streams, self._streams = self._streams, {}
            calls, self._calls = self._calls, {}
        for stream in streams.values():
            stream.put(TokenEvent.ending(stream.request, FinishReason.ERROR, reason))
        for done in calls.values():
            done.set_exception(EngineProcessError(reason))


def _done() -> Future:
    """A future that has already succeeded."""
    done: Future = Future()
    done.set_result(None)
    return done
