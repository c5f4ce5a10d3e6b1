"""Several copies of the model behind one front: PLACEMENT=replicas runs one engine (one copy) per GPU.

``EnginePool`` implements ``EngineClient`` (serve.engine.interface) and is the one place that decides admission:
the cap on requests in flight (429, ``EngineOverloaded``) over every copy, and, through the adapter registry's
gate, which adapters requests may name. Planning happens on a background thread, as loading does: ``prepare()``
fetches the model and decides the placement, then one copy per planned engine loads and starts while the front
loads its own tokenizer. Each request goes to the copy with the fewest requests in flight (ties: the one that has
served fewest); a live session's requests stay on the copy holding its cache.

Once every copy is ready the pool's thread supervises them (``serve.engine.recovery``): a copy whose engine process
died is restarted after a backoff and is out of rotation meanwhile, as is a stalled one; the pool is ready while one
copy is. One crash more than the window allows fails the pool as a load failure does (the worker exits).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any, Callable, Optional

from serve.engine.engine import EngineNotReady
from serve.engine.grammar import GRAMMAR_CHECK, GrammarCheck
from serve.engine.interface import EngineCopy, Stream
from serve.engine.recovery import CrashWindow, Recovery
from serve.engine.types import EngineConfig, EngineLoad, EngineStats, Limits, Request

log = logging.getLogger(__name__)

AdapterGate = Callable[[str], AbstractContextManager[None]]

SUPERVISE_INTERVAL_S = 0.1  # how often the pool looks for dead and stalled copies


class TooManyCrashes(RuntimeError):
    """Engine processes died more often than the restart window allows."""


class EngineOverloaded(RuntimeError):
    """More requests than the admission cap are in flight."""

    @classmethod
    def at(cls, in_flight: int, limit: int) -> "EngineOverloaded":
        return cls(f"{in_flight} requests in flight, the limit is {limit}; retry later")


class EnginePool:
    """Copies made by ``make_engine(prepared, index)`` for each one that ``plan_engines(prepared)`` counts; the
    front's tokenizer from ``load_tokenizer(prepared)``."""

    def __init__(
        self,
        prepare: Callable[[], Any],
        plan_engines: Callable[[Any], int],
        make_engine: Callable[[Any, int], EngineCopy],
        config: EngineConfig = EngineConfig(),
        on_load_failure: Optional[Callable[[BaseException], None]] = None,
        on_ready: Optional[Callable[[], None]] = None,
        load_tokenizer: Callable[[Any], Any] = lambda prepared: None,
        recovery: Recovery = Recovery(),
    ):
        self._prepare, self._plan_engines, self._make_engine = prepare, plan_engines, make_engine
        self._load_tokenizer = load_tokenizer
        self.config = config
        self._on_load_failure, self._on_ready = on_load_failure, on_ready
        self.recovery = recovery
        self._crashes = CrashWindow(recovery)
        self._restart_at: dict[int, float] = {}  # copy index -> when its engine process starts again
        self._stalled: set[int] = set()  # copies logged as stalled
        self.engines: list[EngineCopy] = []
        self._tokenizer: Any = None
        self._adapter_gate: Optional[AdapterGate] = None
        self._session_engines: dict[str, int] = {}  # a live session's requests go to the engine holding its cache
        self.load_error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._main, name="engine-pool", daemon=True)

    def start(self) -> "EnginePool":
        if not self._thread.is_alive() and not self._ready.is_set() and self.load_error is None:
            self._thread.start()
        return self

    def _main(self) -> None:
        """Prepare, start every copy, load the front's tokenizer meanwhile, and wait until all are ready (or one
        fails: a copy's load error is the one reported, else the tokenizer's; the copy loads the same tokenizer first,
        so it fails as fast)."""
        try:
            prepared = self._prepare()
            count = self._plan_engines(prepared)
            with self._lock:
                self.engines = [self._make_engine(prepared, index) for index in range(count)]
            for engine in self.engines:
                engine.start()
            tokenizer_error = self._tokenizer_loaded(prepared)
            if not self._copies_ready():
                return
            if tokenizer_error is not None:
                raise tokenizer_error
        except BaseException as exc:  # noqa: BLE001 - reported like a single engine's load failure
            log.error("engine pool failed to start: %s", exc)
            self._fail(exc)
            return
        self._ready.set()
        log.info("engine pool ready: %d engine(s)", len(self.engines))
        if self._on_ready is not None:
            self._on_ready()
        self._supervise()

    def _fail(self, exc: BaseException) -> None:
        """Stop serving for good: every copy stops, and the owner hears why (the worker exits)."""
        self.load_error = exc
        for engine in self.engines:
            engine.stop(0.5)
        if self._on_load_failure is not None:
            self._on_load_failure(exc)

    def _supervise(self) -> None:
        """Until the pool stops: restart each copy whose engine process died, after its backoff; note stalls."""
        while not self._stopping.wait(SUPERVISE_INTERVAL_S):
            for index, engine in enumerate(self.engines):
                if engine.exited and index not in self._restart_at and not self._schedule_restart(index):
                    return
                self._note_stall(index, engine.stalled)
            now = time.monotonic()
            for index in [index for index, at in self._restart_at.items() if at <= now]:
                del self._restart_at[index]
                self._restart(index)

    def _schedule_restart(self, index: int) -> bool:
        """Count the crash of copy ``index`` and set when it restarts; False (the pool failed) when one too many."""
        wait = self._crashes.crashed()
        if wait is None:
            recovery = self.recovery
            exc = TooManyCrashes(
                f"engine processes died {self._crashes.recent} times within {recovery.window_s:g} s, more than "
                f"ENGINE_MAX_RESTARTS={recovery.max_restarts}; giving up so the instance is replaced"
            )
            log.critical("%s", exc)
            self._fail(exc)
            return False
        log.error(
            "copy %d of the model: its engine process died (%s); restart %d of at most %d within %g s, in %g s",
            index,
            self.engines[index].exit_error,
            self._crashes.recent,
            self.recovery.max_restarts,
            self.recovery.window_s,
            wait,
        )
        self._restart_at[index] = time.monotonic() + wait
        return True

    def _restart(self, index: int) -> None:
        try:
            self.engines[index].restart()
        except Exception as exc:  # noqa: BLE001 - it stays exited, so the next pass counts another crash
            log.error("copy %d of the model could not be restarted: %s", index, exc)

    def _note_stall(self, index: int, stalled: bool) -> None:
        """Log once when a copy stalls (no step while requests are in flight) and once when it moves again."""
        if stalled and index not in self._stalled:
            self._stalled.add(index)
            log.error(
                "copy %d of the model made no engine step for %g s with %d request(s) in flight; it is out of "
                "rotation until it moves again",
                index,
                self.recovery.stall_timeout_s,
                self.engines[index].in_flight,
            )
        elif not stalled and index in self._stalled:
            self._stalled.discard(index)
            log.warning("copy %d of the model is stepping again", index)

    def _tokenizer_loaded(self, prepared: Any) -> Optional[BaseException]:
        """Load the front's tokenizer while the copies load; the error, if it failed."""
        try:
            self._tokenizer = self._load_tokenizer(prepared)
        except Exception as exc:  # noqa: BLE001 - raised once the copies had their chance to fail first
            return exc
        return None

    def _copies_ready(self) -> bool:
        """Wait until every copy is ready (True) or the pool stops (False); raise the first copy's load error."""
        while not all(engine.wait_ready(0.1) for engine in self.engines):
            errors = [engine.load_error for engine in self.engines if engine.load_error is not None]
            if errors:
                raise errors[0]
            if self._stopping.is_set():
                return False
        return True

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        """Started, not failed or stopping, and at least one copy ready to serve."""
        return self._serving and any(engine.ready for engine in self.engines)

    @property
    def _serving(self) -> bool:
        return self._ready.is_set() and not self._stopping.is_set() and self.load_error is None

    @property
    def recovery_state(self) -> Optional[str]:
        """Why a started pool is not ready: ``stalled`` (a copy makes no progress) or ``restarting``."""
        if not self._serving or self.ready:
            return None
        return "stalled" if any(engine.stalled for engine in self.engines) else "restarting"

    @property
    def loaded(self) -> Any:
        return self.engines[0].loaded if self.engines else None

    @property
    def tokenizer(self) -> Any:
        """The front's own tokenizer, loaded from the model folder (never sent over from a copy)."""
        return self._tokenizer

    @property
    def grammars(self) -> GrammarCheck:
        """Checks grammars at the edge; the copies build the vocabulary their matchers need."""
        return GRAMMAR_CHECK

    @property
    def limits(self) -> Optional[Limits]:
        """Per-request limits of one engine; the batch capacity summed over all of them."""
        if not self.engines or self.engines[0].limits is None:
            return None
        first = self.engines[0].limits
        return replace(
            first,
            max_batch_total_tokens=sum(engine.limits.max_batch_total_tokens for engine in self.engines),
            max_batch_size=sum(engine.limits.max_batch_size for engine in self.engines),
            kv_blocks=sum(engine.limits.kv_blocks for engine in self.engines),
        )

    @property
    def running(self) -> int:
        return sum(engine.running for engine in self.engines)

    @property
    def waiting(self) -> int:
        return sum(engine.waiting for engine in self.engines)

    @property
    def in_flight(self) -> int:
        return sum(engine.in_flight for engine in self.engines)

    def stats(self) -> EngineStats:
        """The KV pools and prefix caches of all engines, summed."""
        return sum((engine.stats() for engine in self.engines), EngineStats())

    def gate_adapters(self, gate: AdapterGate) -> None:
        """Admit a request naming an adapter only inside ``gate(name)`` (the adapter registry: AdapterNotLoaded
        for a name it does not hold, and its retire sent only after the admissions it let through)."""
        self._adapter_gate = gate

    def submit(self, request: Request, sink: Optional[queue.Queue] = None, index: int = 0) -> Stream:
        """Admit on the least-loaded ready copy (a live session's on its own while it is ready); EngineOverloaded
        past the pool's cap."""
        if not self._serving:
            raise EngineNotReady.because(self.load_error)
        gate = self._adapter_gate
        with nullcontext() if request.adapter is None or gate is None else gate(request.adapter), self._lock:
            in_flight = [engine.in_flight for engine in self.engines]
            if sum(in_flight) >= self.config.max_concurrent_requests:
                raise EngineOverloaded.at(sum(in_flight), self.config.max_concurrent_requests)
            ready = [i for i, engine in enumerate(self.engines) if engine.ready]
            if not ready:
                raise EngineNotReady(f"no copy of the model is ready ({self.recovery_state}); retry shortly")
            chosen = min(ready, key=lambda i: (in_flight[i], self.engines[i].served))
            if request.session_id is not None:
                chosen = self._session_copy(request.session_id, chosen, ready)
            return self.engines[chosen].submit(request, sink, index)

    def _session_copy(self, session_id: str, chosen: int, ready: list[int]) -> int:
        """The copy holding the session's cache; a session whose copy died or stalled moves to ``chosen`` (its
        cache is gone or out of reach: the conversation is computed again there)."""
        pinned = self._session_engines.setdefault(session_id, chosen)
        if pinned not in ready:
            log.warning("session %s moves from copy %d (not ready) to copy %d", session_id, pinned, chosen)
            self._session_engines[session_id] = pinned = chosen
        return pinned

    def cancel(self, request_id: str) -> None:
        """Cancel wherever the request runs (an engine ignores ids it does not hold)."""
        for engine in self.engines:
            engine.cancel(request_id)

    def close_session(self, session_id: str) -> None:
        """Unpin the session's prefix-cache blocks in every engine (each engine ignores sessions it never saw)."""
        with self._lock:
            self._session_engines.pop(session_id, None)
        for engine in self.engines:
            engine.close_session(session_id)

    def describe(self) -> list[EngineLoad]:
        return [load for engine in self.engines for load in engine.describe()]

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every copy, side by side (each may take ``timeout`` before it is killed)."""
        self._stopping.set()
        stoppers = [threading.Thread(target=engine.stop, args=(timeout,), daemon=True) for engine in self.engines]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()
