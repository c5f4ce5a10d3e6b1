"""The engine process's side of the pipe: runs an ``Engine`` and serves the front's messages (serve.engine.protocol).

One thread reads the pipe and decodes each message in ``Core.handle``; the engine thread sends each step's events
as one ``Events`` message. Every request's events go straight into the outbox's one queue (the engine's sink,
tagged with the request's key), so the core holds no queue or thread per request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

from serve.engine.adapters import AdapterError
from serve.engine.engine import Engine
from serve.engine.protocol import (
    CallDone,
    Cancel,
    CloseSession,
    DeviceName,
    Events,
    Failed,
    InstallAdapter,
    ModelCard,
    ModelView,
    Ready,
    RetireAdapter,
    Snapshot,
    Stop,
    Submit,
    dispatch,
)
from serve.engine.types import EngineConfig, FinishReason, TokenEvent

log = logging.getLogger(__name__)

SNAPSHOT_INTERVAL_S = 0.25  # an idle engine still reports its counters this often


class Outbox:
    """The engine's one sink: ``events`` takes every request's ``(key, event)``; ``flush`` sends them as one
    message with the engine's counters."""

    def __init__(self, conn: Any):
        self.events: "queue.Queue[tuple[int, TokenEvent]]" = queue.Queue()
        self._conn = conn
        self._send_lock = threading.Lock()
        self._last_sent = 0.0

    def flush(self, engine: Engine) -> None:
        """After an engine step (or before an idle wait): the events so far, and the counters."""
        events = []
        while True:
            try:
                events.append(self.events.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        if events or now - self._last_sent >= SNAPSHOT_INTERVAL_S:
            self._last_sent = now
            self.send(Events(tuple(events), Snapshot(engine.waiting, engine.running, engine.stats())))

    def send(self, message: object) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):
            pass  # the front is gone; the command loop sees the pipe close and stops the engine


class Core:
    """Decodes the front's messages for one engine (``handle``); ``stopped`` once told to stop."""

    def __init__(self, engine: Engine, outbox: Outbox):
        self.engine, self.outbox = engine, outbox
        self.stopped = False
        self._handlers: dict[type, Callable[[Any], None]] = {
            Submit: self._submit,
            Cancel: lambda message: engine.cancel(message.request_id),
            CloseSession: lambda message: engine.close_session(message.session_id),
            InstallAdapter: self._install,
            RetireAdapter: self._retire,
            Stop: self._stop,
        }

    def handle(self, message: object) -> None:
        dispatch(message, self._handlers, "engine process")

    def _submit(self, message: Submit) -> None:
        """Admit the request; one the engine refuses ends at once with its reason."""
        try:
            self.engine.submit(message.request, self.outbox.events, message.key)
        except Exception as exc:  # noqa: BLE001 - not ready, or an adapter retired: the request fails alone
            ending = TokenEvent.ending(message.request, FinishReason.ERROR, str(exc))
            self.outbox.events.put((message.key, ending))
            self.outbox.flush(self.engine)

    def _install(self, message: InstallAdapter) -> None:
        """Read and prepare the adapter on a thread of its own (a file read must not hold up the pipe)."""
        threading.Thread(target=self._read_and_install, args=(message,), name="adapter-install", daemon=True).start()

    def _read_and_install(self, message: InstallAdapter) -> None:
        from serve.engine.lora import AdapterWeights, read_adapter

        try:
            modules = read_adapter(message.name, Path(message.folder), message.max_rank)
            done = self.engine.install_adapter(message.name, AdapterWeights(message.number, modules))
        except Exception as exc:  # noqa: BLE001 - reported to the front's caller: the adapter, not the server
            refused = exc if isinstance(exc, AdapterError) else AdapterError(f"adapter {message.name!r}: {exc}")
            self._reply(message.call, refused)
            return
        done.add_done_callback(lambda future: self._reply(message.call, future.exception()))

    def _retire(self, message: RetireAdapter) -> None:
        """In order with the submits: a request sent before the retire is admitted, none after it."""
        done = self.engine.retire_adapter(message.name)
        done.add_done_callback(lambda future: self._reply(message.call, future.exception()))

    def _reply(self, call: int, error: BaseException | None) -> None:
        text = None if error is None else str(error)
        self.outbox.send(CallDone(call, text, isinstance(error, AdapterError)))

    def _stop(self, message: Stop) -> None:
        self.stopped = True


def host_engine(conn: Any, load: Callable[[], Any], config: EngineConfig) -> None:
    """In the engine process: run an ``Engine`` over ``load`` and serve the front's messages until told to stop
    or until the pipe closes."""
    outbox = Outbox(conn)
    engine: Engine

    def on_ready() -> None:
        outbox.send(ready_message(engine))

    def on_failure(exc: BaseException) -> None:
        outbox.send(Failed(str(exc)))

    engine = Engine(load, config, on_failure, on_ready, flush_events=lambda: outbox.flush(engine))
    core = Core(engine, outbox)
    engine.start()
    try:
        while not core.stopped:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            core.handle(message)
    finally:
        engine.stop()


def ready_message(engine: Engine) -> Ready:
    """The loaded model as the front may know it (no weights, no tokenizer), the limits and the start-up report."""
    loaded = engine.loaded
    device = getattr(loaded, "device", None)
    lora = getattr(loaded.model, "serve_lora", None)
    card = ModelCard(
        name=loaded.name,
        model=ModelView(loaded.model.config),
        device=DeviceName(getattr(device, "type", str(device)), str(device)),
        dtype=str(getattr(loaded, "dtype", None)),
        plan=getattr(loaded, "plan", None),
        quantization=getattr(loaded, "quantization", None),
        cpu_weights=getattr(loaded, "cpu_weights", None),
        adapters=lora.numbers if lora is not None else {},
    )
    return Ready(card, engine.limits, frozenset(engine.eos_ids), engine.describe()[0])
