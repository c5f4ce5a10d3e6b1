"""One engine in a process of its own (ENGINE_PROCESS): the HTTP worker's threads and the engine's step stop
sharing one GIL.

``EngineProcess`` stands in the gunicorn worker for an ``Engine`` (what ``EnginePool`` needs of one); a spawned
child runs the real ``Engine`` through ``host_engine``. They talk over one duplex pipe:

- front -> host: ``("submit", key, request)``, ``("cancel", request_id)``, ``("close_session", session_id)``,
  ``("install", call, name, modules)``, ``("retire", call, name)``, ``("stop",)``;
- host -> front: ``("ready", card)``, ``("failed", reason)``, ``("events", [(key, event), ...], snapshot)`` (all
  the events of one engine step in one message), ``("done", call, error)``.

The front counts its own requests in flight (a request leaves the count when its final event arrives), so the
admission cap, the pool's choice of engine and the shutdown drain never wait on the child. Torch is imported by
the child only; the child exits when the pipe closes, so a worker that dies leaves no engine behind.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, is_dataclass, replace
from typing import Any, Callable, Optional

from serve.engine.adapters import AdapterNotLoaded
from serve.engine.engine import Engine, EngineNotReady, RequestStream
from serve.engine.scheduler import EngineOverloaded
from serve.engine.types import EngineConfig, EngineLoad, EngineStats, FinishReason, Limits, Request, TokenEvent

log = logging.getLogger(__name__)

SNAPSHOT_INTERVAL_S = 0.25  # an idle engine still reports its counters this often


class EngineProcessError(RuntimeError):
    """The engine process failed to load its model, or exited while serving."""


@dataclass(frozen=True)
class ModelView:
    """What the front knows of the model whose weights live in the engine process."""

    config: Any  # the transformers config
    device: Any
    dtype: Any


@dataclass(frozen=True)
class Card:
    """Sent once, when the engine is ready: the loaded model as the front sees it, and the engine's limits."""

    loaded: Any  # the loader's LoadedModel with ``model`` a ModelView (tokenizer, name, placement, ...)
    limits: Limits
    eos_ids: frozenset[int]
    load: EngineLoad  # CUDA graphs and COMPILE, as start-up left them


@dataclass(frozen=True)
class Snapshot:
    """The engine's counters, sent with every batch of events (and every SNAPSHOT_INTERVAL_S when idle)."""

    waiting: int = 0
    running: int = 0
    stats: EngineStats = field(default_factory=EngineStats)


class EngineProcess:
    """An engine in a spawned child process; ``target(conn, *args)`` runs there and ends in ``host_engine``."""

    def __init__(self, target: Callable[..., None], args: tuple, config: EngineConfig = EngineConfig()):
        self.config = config
        self.load_error: Optional[BaseException] = None
        self.loaded: Any = None
        self.limits: Optional[Limits] = None
        self._grammars: Any = None
        self._grammars_built = threading.Event()
        self._target, self._args = target, args
        self._process: Optional[multiprocessing.process.BaseProcess] = None
        self._conn: Any = None
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # the streams in flight and the accepted adapters
        self._streams: dict[int, RequestStream] = {}
        self._keys = itertools.count()
        self._calls: dict[int, Future] = {}
        self._adapters: set[str] = set()
        self._card: Optional[Card] = None
        self._snapshot = Snapshot()
        self._served = 0
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)

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
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def engines(self) -> list["EngineProcess"]:
        return [self]

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
        graphs, compiled = (self._card.load.graphs, self._card.load.compiled) if self._card else (None, None)
        return [EngineLoad(self.in_flight, self._served, graphs, compiled)]

    def submit(self, request: Request, sink: Optional[queue.Queue] = None, index: int = 0) -> RequestStream:
        """Admit a request (the same errors as ``Engine.submit``) and send it to the engine process."""
        if not self.ready:
            raise EngineNotReady.because(self.load_error)
        stream = RequestStream(request, self, sink, index)  # type: ignore[arg-type]  # it only calls cancel()
        with self._lock:
            if request.adapter is not None and request.adapter not in self._adapters:
                raise AdapterNotLoaded(f"adapter {request.adapter!r} is not loaded")
            if len(self._streams) >= self.config.max_concurrent_requests:
                raise EngineOverloaded.at(len(self._streams), self.config.max_concurrent_requests)
            key = next(self._keys)
            self._streams[key] = stream
            self._served += 1
        self._send(("submit", key, request))
        return stream

    def cancel(self, request_id: str) -> None:
        self._send(("cancel", request_id))

    def close_session(self, session_id: str) -> None:
        self._send(("close_session", session_id))

    def install_adapter(self, name: str, modules: Any) -> Future:
        """The engine process prepares and links the adapter; the future resolves once requests may use it."""
        done = self._call("install", name, modules)
        done.add_done_callback(lambda future: future.exception() is None and self._accept(name))
        return done

    def retire_adapter(self, name: str) -> Future:
        with self._lock:
            self._adapters.discard(name)
        return self._call("retire", name)

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the engine process to stop; past ``timeout`` it is terminated."""
        if self._stopping.is_set() and not self._reader.is_alive():
            return  # stopped already
        self._stopping.set()
        if self._process is None:
            return
        self._send(("stop",))
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(2.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._reader.join(1.0)

    def _accept(self, name: str) -> None:
        with self._lock:
            self._adapters.add(name)

    def _call(self, kind: str, *args: Any) -> Future:
        done: Future = Future()
        with self._lock:
            call = next(self._keys)
            self._calls[call] = done
        if not self._send((kind, call, *args)):
            self._calls.pop(call, None)
            done.set_exception(EngineProcessError("the engine process is not running"))
        return done

    def _send(self, message: tuple) -> bool:
        """Send to the engine process; False when it is gone (the reader fails what was in flight)."""
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, ValueError, AttributeError):
            return False

    def _read(self) -> None:
        """The front's one reader: delivers each batch of events to its streams, and the replies to calls."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            kind = message[0]
            if kind == "events":
                self._deliver(message[1])
                self._snapshot = message[2]
            elif kind == "ready":
                self._on_ready(message[1])
            elif kind == "done":
                done = self._calls.pop(message[1], None)
                if done is not None:
                    error = message[2]
                    done.set_result(None) if error is None else done.set_exception(error)
            elif kind == "failed":
                self.load_error = EngineProcessError(message[1])
                self._send(("stop",))  # nothing more to do there
        self._on_exit()

    def _on_ready(self, card: Card) -> None:
        self._card, self.loaded, self.limits = card, card.loaded, card.limits
        with self._lock:
            self._adapters.update(getattr(card.loaded, "adapters", ()))
        threading.Thread(target=self._build_grammars, args=(card,), name="grammars", daemon=True).start()
        self._ready.set()

    def _build_grammars(self, card: Card) -> None:
        """The front's own llguidance vocabulary, to check grammars at the edge (about a second for 49k tokens:
        off the path to ready; the first grammar request waits for it)."""
        from serve.engine.grammar import Grammars

        try:
            vocab_size = card.loaded.model.config.get_text_config().vocab_size
            self._grammars = Grammars(card.loaded.tokenizer, vocab_size, card.eos_ids)
        finally:
            self._grammars_built.set()

    @property
    def grammars(self) -> Any:
        self._grammars_built.wait()
        return self._grammars

    def _deliver(self, events: list[tuple[int, TokenEvent]]) -> None:
        for key, event in events:
            if event.finish_reason is None:
                stream = self._streams.get(key)
            else:
                with self._lock:
                    stream = self._streams.pop(key, None)
            if stream is not None:
                stream.put(event)

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


class Outbox:
    """In the engine process: the sink every stream puts ``(key, event)`` into; ``flush`` sends them as one
    message with the engine's counters."""

    def __init__(self, conn: Any):
        self._conn = conn
        self._lock = threading.Lock()
        self._events: list[tuple[int, TokenEvent]] = []
        self._last_sent = 0.0

    def put(self, item: tuple[int, TokenEvent]) -> None:
        with self._lock:
            self._events.append(item)

    def flush(self, engine: Engine) -> None:
        """After an engine step (or before an idle wait): the events so far, and the counters."""
        with self._lock:
            events, self._events = self._events, []
        now = time.monotonic()
        if events or now - self._last_sent >= SNAPSHOT_INTERVAL_S:
            self._last_sent = now
            self.send(("events", events, Snapshot(engine.waiting, engine.running, engine.stats())))

    def send(self, message: tuple) -> None:
        try:
            with self._lock:
                self._conn.send(message)
        except (OSError, ValueError):
            pass  # the front is gone; the command loop sees the pipe close and stops the engine


def host_engine(conn: Any, load: Callable[[], Any], config: EngineConfig) -> None:
    """In the engine process: run an ``Engine`` over ``load`` and serve the front's commands until told to stop
    or until the pipe closes."""
    outbox = Outbox(conn)
    engine: Engine

    def on_ready() -> None:
        outbox.send(("ready", _card(engine)))

    def on_failure(exc: BaseException) -> None:
        outbox.send(("failed", str(exc)))

    engine = Engine(load, config, on_failure, on_ready, flush_events=lambda: outbox.flush(engine))
    engine.start()
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "stop":
                break
            _command(engine, outbox, message)
    finally:
        engine.stop()


def _command(engine: Engine, outbox: Outbox, message: tuple) -> None:
    kind = message[0]
    if kind == "submit":
        key, request = message[1], message[2]
        try:
            engine.submit(request, outbox, key)  # type: ignore[arg-type]  # the outbox takes (key, event) puts
        except (EngineNotReady, EngineOverloaded, AdapterNotLoaded) as exc:
            outbox.put((key, TokenEvent.ending(request, FinishReason.ERROR, str(exc))))
            outbox.flush(engine)
    elif kind == "cancel":
        engine.cancel(message[1])
    elif kind == "close_session":
        engine.close_session(message[1])
    elif kind in ("install", "retire"):
        call = message[1]
        try:
            done = engine.install_adapter(*message[2:]) if kind == "install" else engine.retire_adapter(message[2])
        except Exception as exc:  # noqa: BLE001 - reported to the front's caller
            outbox.send(("done", call, exc))
            return
        done.add_done_callback(lambda future: outbox.send(("done", call, future.exception())))


def _card(engine: Engine) -> Card:
    """The loaded model as the front may know it: everything but the weights."""
    loaded, model = engine.loaded, engine.loaded.model
    view = ModelView(model.config, getattr(model, "device", None), getattr(model, "dtype", None))
    front = replace(loaded, model=view) if is_dataclass(loaded) else loaded
    return Card(front, engine.limits, frozenset(engine.eos_ids), engine.describe()[0])
