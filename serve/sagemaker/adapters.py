"""LoRA adapters registered and unregistered at run time (SageMaker inference components for adapters).

The registry is the front's one record of adapters: names, sources, aliases, folders and install numbers. Names and
aliases share one namespace, so a name always selects exactly one adapter's weights. It also gates admission: the
pool admits a request naming an adapter only while the registry holds it ready (``admitting``). ``register`` finds
the peft folder inside the allowed roots (``serve.sagemaker.adapter_sources``), gives the adapter the next install
number and sends both to each engine copy, whose process reads and checks the weights and links them in between two
steps; at most ``MAX_LORA_ADAPTERS`` are loaded at once (the least recently used idle one makes room). Registers run
at most ``REGISTER_WORKERS`` at once and within ``REGISTER_TIMEOUT``. ``unregister`` stops new requests at once and
returns when the requests already running on the adapter have finished, its weights are gone and the files its
register unpacked are removed. Adapters given at start (``SM_MODEL_DIR/adapters``, ``LORA_ADAPTERS``) are listed
here too, with the numbers the copies gave them, and can be unregistered the same way.
"""

from __future__ import annotations

import itertools
import logging
import re
import shutil
import threading
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from serve.config import Settings
from serve.engine.adapters import AdapterError, AdapterNotLoaded
from serve.errors import BadRequest, NotFound, NotReady, Overloaded, ServeError
from serve.sagemaker.adapter_sources import RegisterTimeout, SourcePolicy, find_adapter, inside_roots

log = logging.getLogger(__name__)

REGISTER_WORKERS = 2  # registers running at once; more get a 429 (so HTTP threads stay free for /ping)
REGISTER_TIMEOUT = 120.0  # seconds a register may take, unpacking and every engine copy's install included
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AdapterConflict(ServeError):
    """The name is taken (by an adapter or an alias), being registered or deleted, or no adapter can make room."""

    status = 409
    error_type = "conflict"


def check_name(value: str, field: str) -> str:
    """``value`` when it is a safe adapter name or alias (it appears in URLs, logs and file names)."""
    if not NAME.fullmatch(value):
        shown = value if len(value) <= 70 else value[:67] + "..."
        raise BadRequest(
            f"{field}: {shown!r} is not a valid adapter name: use 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field,
        )
    return value


@dataclass
class Entry:
    """One adapter known to the server; ``state`` is loading, ready or deleting; ``number`` its install number;
    ``unpacked`` the folder its register unpacked; ``last_used`` when a request last named it (a tick)."""

    name: str
    src: Optional[str]
    alias: Optional[str]
    state: str
    number: int
    folder: Optional[Path] = None
    unpacked: Optional[Path] = None
    last_used: int = 0


class AdapterRegistry:
    """Names, sources and aliases of the served adapters, and their loading into every engine copy."""

    def __init__(self, engine: Any, settings: Settings):
        self._engine = engine  # an EnginePool (of engine processes); an in-process Engine gates adapters itself
        self._sources = SourcePolicy.from_settings(settings)
        self._max_rank = settings.max_lora_rank
        self._max_adapters = settings.max_lora_adapters
        self._slots = threading.BoundedSemaphore(REGISTER_WORKERS)
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
        self._ticks = itertools.count(1)
        self._last_number = 0
        self._seeded = False
        gate = getattr(engine, "gate_adapters", None)
        if gate is not None:
            gate(self.admitting)

    def _engines(self) -> list[Any]:
        if not self._engine.ready:
            raise NotReady("the model is still loading; retry when /ping answers 200")
        return list(self._engine.engines)

    def _seed(self) -> None:
        """Adopt the adapters loaded with the model at start (once the model is loaded); call with the lock held."""
        if not self._seeded and self._engine.ready:
            started = getattr(self._engine.loaded, "adapters", ())
            numbers = started if isinstance(started, dict) else {name: n for n, name in enumerate(started, 1)}
            for name, number in numbers.items():
                self._entries.setdefault(name, Entry(name, None, None, "ready", number))
            self._last_number = max([self._last_number, *numbers.values()])
            self._seeded = True

    @contextmanager
    def admitting(self, name: str) -> Iterator[None]:
        """Hold the registry while a request for ``name`` is sent (so a retire goes out after it);
        AdapterNotLoaded when ``name`` is not ready."""
        with self._lock:
            self._seed()
            entry = self._entries.get(name)
            if entry is None or entry.state != "ready":
                raise AdapterNotLoaded(f"adapter {name!r} is not loaded")
            entry.last_used = next(self._ticks)
            yield

    def names(self) -> tuple[str, ...]:
        """The adapters requests may use now, in the order they were added."""
        with self._lock:
            self._seed()
            return tuple(name for name, entry in self._entries.items() if entry.state == "ready")

    def resolve(self, name: str) -> Optional[str]:
        """The adapter a request header names, by its name or by the alias it was registered under (one
        namespace: a name is never also an alias)."""
        with self._lock:
            self._seed()
            for entry in self._entries.values():
                if entry.state == "ready" and name in (entry.name, entry.alias):
                    return entry.name
        return None

    def register(self, name: str, src: str, alias: Optional[str] = None) -> bool:
        """Load ``src`` as adapter ``name`` into every engine; False when the same src was registered already."""
        check_name(name, "name")
        alias = None if alias in (None, name) else check_name(alias, "alias")
        inside_roots(src, self._sources)  # cheap: a source outside the roots never takes a register's slot
        engines = self._engines()
        if not self._slots.acquire(blocking=False):
            raise Overloaded(f"{REGISTER_WORKERS} adapter registrations are running already; retry when one ends")
        try:
            return self._register(name, src, alias, engines, time.monotonic() + REGISTER_TIMEOUT)
        finally:
            self._slots.release()

    def _register(self, name: str, src: str, alias: Optional[str], engines: list[Any], deadline: float) -> bool:
        with self._lock:
            self._seed()
            existing = self._entries.get(name)
            if existing is not None and existing.state == "ready" and (existing.src, existing.alias) == (src, alias):
                return False
            self._check_free(name, alias, src)
            victim = self._make_room()
            self._last_number += 1
            entry = self._entries[name] = Entry(name, src, alias, "loading", self._last_number)
        try:
            if victim is not None:
                self._evict(victim, engines)
            self._load(entry, engines, deadline)
        except BaseException:
            with self._lock:
                if entry.state == "loading":  # an abandoned install keeps its name until the copies answered
                    self._forget(entry)
            raise
        with self._lock:
            entry.state, entry.last_used = "ready", next(self._ticks)
        log.info("adapter %r registered from %r", name, src)
        return True

    def _check_free(self, name: str, alias: Optional[str], src: str) -> None:
        """AdapterConflict when ``name`` or ``alias`` is already a name or an alias; call with the lock held."""
        for entry in self._entries.values():
            if name == entry.name:
                raise AdapterConflict(_conflict(entry, src), "name")
            if name == entry.alias:
                raise AdapterConflict(f"name: {name!r} is the alias of adapter {entry.name!r}", "name")
            if alias is not None and alias in (entry.name, entry.alias):
                raise AdapterConflict(f"alias: {alias!r} is already taken by adapter {entry.name!r}", "alias")

    def _make_room(self) -> Optional[Entry]:
        """The least recently used idle adapter to evict when MAX_LORA_ADAPTERS are loaded (marked deleting);
        AdapterConflict when every one is busy; call with the lock held."""
        if len(self._entries) < self._max_adapters:
            return None
        idle = [entry for entry in self._entries.values() if entry.state == "ready" and not self._in_use(entry.name)]
        if not idle:
            raise AdapterConflict(
                f"name: MAX_LORA_ADAPTERS={self._max_adapters} adapters are loaded and every one is in use or "
                "changing; retry later or unregister one",
                "name",
            )
        victim = min(idle, key=lambda entry: entry.last_used)
        victim.state = "deleting"
        return victim

    def _in_use(self, name: str) -> bool:
        """True while a request this front sent on adapter ``name`` has not ended (in any engine copy)."""
        return any(getattr(engine, "uses_adapter", lambda _: False)(name) for engine in self._engine.engines)

    def _evict(self, victim: Entry, engines: list[Any]) -> None:
        try:
            for future in [engine.retire_adapter(victim.name) for engine in engines]:
                future.result(REGISTER_TIMEOUT)
        finally:
            with self._lock:
                self._forget(victim)
        log.info(
            "adapter %r evicted: MAX_LORA_ADAPTERS=%d, and it was used least recently", victim.name, self._max_adapters
        )

    def _load(self, entry: Entry, engines: list[Any], deadline: float) -> None:
        """Install in every copy (each reads the folder itself); on a failure, retire it wherever it was installed."""
        found = find_adapter(entry.src or "", self._sources, deadline, entry.name)
        entry.folder, entry.unpacked = found.folder, found.unpacked
        futures = [
            engine.install_adapter(entry.name, entry.number, str(found.folder), self._max_rank) for engine in engines
        ]
        failure = _first_failure(futures, deadline)
        if failure is not None:
            with self._lock:
                entry.state = "deleting"  # the name stays taken until every copy has answered and let go of it
            self._abandon(entry, engines, futures)
            raise failure

    def _abandon(self, entry: Entry, engines: list[Any], futures: list[Future]) -> None:
        """Retire the adapter from the copies that installed it (now or later); forget it once all have answered."""
        left = [len(futures)]
        lock = threading.Lock()

        def settled(_: Any = None) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                with self._lock:
                    self._forget(entry)

        def answered(engine: Any, future: Future) -> None:
            if future.cancelled() or future.exception() is not None:
                settled()
            else:
                engine.retire_adapter(entry.name).add_done_callback(settled)

        for engine, future in zip(engines, futures):
            future.add_done_callback(lambda done, engine=engine: answered(engine, done))

    def _forget(self, entry: Entry) -> None:
        """Drop ``entry`` and the files its register unpacked; call with the lock held."""
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]
        if entry.unpacked is not None:
            shutil.rmtree(entry.unpacked, ignore_errors=True)

    def unregister(self, name: str) -> None:
        """Refuse new requests for ``name`` now; return once its running requests finished and it is unloaded."""
        engines = self._engines()
        with self._lock:
            self._seed()
            entry = self._entries.get(name)
            if entry is None or entry.state != "ready":
                raise NotFound(
                    f"adapter {name!r} was not found" + ("" if entry is None else f" (it is {entry.state})"), "name"
                )
            entry.state = "deleting"
        try:
            for future in [engine.retire_adapter(name) for engine in engines]:
                future.result()
        finally:
            with self._lock:
                self._forget(entry)
        log.info("adapter %r unregistered", name)


def _first_failure(futures: list[Future], deadline: float) -> Optional[Exception]:
    """Wait for every install until ``deadline``; the first failure as the client should see it (None: all fine)."""
    for future in futures:
        try:
            future.result(max(deadline - time.monotonic(), 0.0))
        except FutureTimeout:
            return RegisterTimeout(f"src: loading the adapter took longer than {REGISTER_TIMEOUT:g} s", "src")
        except AdapterError as exc:
            return BadRequest(f"src: {exc}", "src")
        except Exception as exc:  # noqa: BLE001 - an engine copy that died: its own error, as before
            return exc
    return None


def _conflict(existing: Entry, src: str) -> str:
    if existing.state != "ready":
        doing = "registered" if existing.state == "loading" else "deleted"
        return f"name: adapter {existing.name!r} is being {doing}; retry"
    origin = existing.src or "the adapters loaded at start"
    return f"name: adapter {existing.name!r} is already registered from {origin}, not {src}; unregister it first"
