"""LoRA adapters registered and unregistered at run time (SageMaker inference components for adapters).

The registry is the front's one record of adapters: names, sources, aliases, folders and install numbers. It
also gates admission: the pool admits a request naming an adapter only while the registry holds it ready
(``admitting``). ``register`` finds the peft folder, gives the adapter the next install number and sends both to
each engine copy, whose process reads the weights, prepares them for its model and links them in between two
steps. ``unregister`` stops new requests at once and returns when the requests already running on the adapter
have finished and its weights are gone. Adapters given at start (``SM_MODEL_DIR/adapters``, ``LORA_ADAPTERS``) are
listed here too, with the numbers the copies gave them, and can be unregistered the same way.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from serve.engine.adapters import AdapterError, AdapterNotLoaded
from serve.errors import BadRequest, NotFound, NotReady, ServeError

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SWAP_TIMEOUT = 120.0  # seconds an engine may take to reach its next step boundary


class AdapterConflict(ServeError):
    """The name is registered already, from another source (or is being registered or deleted right now)."""

    status = 409
    error_type = "conflict"


@dataclass
class Entry:
    """One adapter known to the server; ``state`` is loading, ready or deleting; ``number`` its install number."""

    name: str
    src: Optional[str]
    alias: Optional[str]
    state: str
    number: int
    folder: Optional[Path] = None


class AdapterRegistry:
    """Names, sources and aliases of the served adapters, and their loading into every engine copy."""

    def __init__(self, engine: Any, cache_dir: str, max_rank: Optional[int]):
        self._engine = engine  # an EnginePool (of engine processes); an in-process Engine gates adapters itself
        self._root = Path(cache_dir) / "adapters"
        self._max_rank = max_rank
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] = {}
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
            yield

    def names(self) -> tuple[str, ...]:
        """The adapters requests may use now, in the order they were added."""
        with self._lock:
            self._seed()
            return tuple(name for name, entry in self._entries.items() if entry.state == "ready")

    def resolve(self, name: str) -> Optional[str]:
        """The adapter a request header names, by its name or by the alias it was registered under."""
        with self._lock:
            self._seed()
            for entry in self._entries.values():
                if entry.state == "ready" and name in (entry.name, entry.alias):
                    return entry.name
        return None

    def register(self, name: str, src: str, alias: Optional[str] = None) -> bool:
        """Load ``src`` as adapter ``name`` into every engine; False when the same src was registered already."""
        engines = self._engines()
        with self._lock:
            self._seed()
            existing = self._entries.get(name)
            if existing is not None:
                if existing.state == "ready" and existing.src == src:
                    return False
                raise AdapterConflict(_conflict(existing, src), "name")
            self._last_number += 1
            entry = self._entries[name] = Entry(name, src, alias, "loading", self._last_number)
        try:
            self._load(entry, engines)
        except BaseException:
            with self._lock:
                self._entries.pop(name, None)
            raise
        with self._lock:
            self._entries[name].state = "ready"
        log.info("adapter %s registered from %s", name, src)
        return True

    def _load(self, entry: Entry, engines: list[Any]) -> None:
        """Install in every copy (each reads the folder itself); on a failure, retire it where it was installed."""
        entry.folder = adapter_folder(entry.src or "", self._root)
        installed: list[Any] = []
        try:
            for engine in engines:
                engine.install_adapter(entry.name, entry.number, str(entry.folder), self._max_rank).result(SWAP_TIMEOUT)
                installed.append(engine)
        except AdapterError as exc:
            raise BadRequest(f"src: {exc}", "src") from None
        finally:
            if len(installed) != len(engines):
                for engine in installed:
                    engine.retire_adapter(entry.name)

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
                self._entries.pop(name, None)
        log.info("adapter %s unregistered", name)


def _conflict(existing: Entry, src: str) -> str:
    if existing.state != "ready":
        doing = "registered" if existing.state == "loading" else "deleted"
        return f"name: adapter {existing.name!r} is being {doing}; retry"
    origin = existing.src or "the adapters loaded at start"
    return f"name: adapter {existing.name!r} is already registered from {origin}, not {src}; unregister it first"


def adapter_folder(src: str, root: Path) -> Path:
    """The peft folder behind ``src``: the folder itself (or its one sub-folder holding the adapter), or a .tar.gz
    (given, or the only one in the folder) unpacked."""
    path = Path(src).expanduser()
    if not path.exists():
        raise BadRequest(f"src: {src} does not exist", "src")
    if path.is_dir():
        archives = sorted(path.glob("*.tar.gz")) + sorted(path.glob("*.tgz"))
        if (path / CONFIG_FILE).is_file() or not archives:
            return _find_config(path, src)
        if len(archives) != 1:
            raise BadRequest(f"src: {src} holds {len(archives)} .tar.gz archives; give the path of one", "src")
        path = archives[0]
    return _find_config(unpack(path, root), src)


def unpack(archive: Path, root: Path) -> Path:
    """Unpack a .tar.gz once into ``root`` (cached by path, size and time); only plain files and folders inside it."""
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    target = root / key
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=root))
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(staging, filter="data")  # refuses absolute paths, '..', links out and device files
        staging.rename(target)
    except (tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise BadRequest(f"src: {archive} cannot be unpacked safely: {exc}", "src") from None
    return target


def _find_config(folder: Path, src: str) -> Path:
    """The folder holding adapter_config.json: ``folder`` itself or its one sub-folder that holds one."""
    if (folder / CONFIG_FILE).is_file():
        return folder
    subfolders = [sub for sub in folder.iterdir() if sub.is_dir() and (sub / CONFIG_FILE).is_file()]
    if len(subfolders) == 1:
        return subfolders[0]
    raise BadRequest(f"src: {src} holds no {CONFIG_FILE} (adapter weights missing)", "src")
