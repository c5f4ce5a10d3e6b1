"""Adapters added and removed while the engine runs: which names an engine accepts, and swaps between steps.

A thread of the engine process reads and prepares an adapter's weights (``serve.engine.lora``), then hands them
over here; the engine thread installs them at the top of its next loop iteration, so a step never waits on a file.
Removal is two-phase: ``retire`` stops new requests at once (``submit`` checks under the same lock), and the
engine thread drops the weights once no admitted request uses them, so requests already running finish first.
No torch here: the engine module imports this before the model (and torch) loads.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional


log = logging.getLogger(__name__)


class AdapterError(ValueError):
    """An adapter folder that cannot be served; the message names the adapter and the reason."""


class AdapterNotLoaded(LookupError):
    """A request names an adapter this engine does not serve (never registered, or deleted)."""


UNSUPPORTED_OPTIONS = ("use_dora", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern")


def check_config(name: str, config: object, max_rank: Optional[int]) -> tuple[int, float]:
    """The rank and scale of a parsed adapter_config.json; AdapterError naming the first field we cannot serve."""
    where = f"adapter {name!r}: adapter_config.json"
    if not isinstance(config, dict):
        raise AdapterError(f"{where} must hold a JSON object, not a {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type {config.get('peft_type')!r} is not served (LoRA only)")
    for option in UNSUPPORTED_OPTIONS:
        if config.get(option) not in (None, False, {}, []):
            raise AdapterError(f"adapter {name!r}: {option}={config[option]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: bias={config['bias']!r} is not supported")
    rank = config.get("r", 8)
    if not _is_int(rank) or rank < 1:
        raise AdapterError(f"{where}: r must be a positive integer, not {_shown(rank)}")
    if max_rank is not None and rank > max_rank:
        raise AdapterError(f"adapter {name!r}: rank {rank} is greater than MAX_LORA_RANK={max_rank}")
    alpha = config.get("lora_alpha", 8)
    if not _is_number(alpha) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"{where}: lora_alpha must be a finite number above 0, not {_shown(alpha)}")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise AdapterError(f"{where}: use_rslora must be true or false, not {_shown(rslora)}")
    return rank, float(alpha) / (math.sqrt(rank) if rslora else rank)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: object) -> str:
    """A field's value for an error message, cut short (a config may hold anything)."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class AdapterTable:
    """The swaps waiting for the engine thread, over the core's one weight table (``serve.engine.lora.LoraSet``).

    An adapter is accepted while the weight table holds it and it is not being retired; nothing else keeps names."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._lora: Any = None  # the model's LoraSet, once loaded (None: the model serves no adapters)
        self._retiring: set[str] = set()
        self._pending: list[tuple[str, str, Any, Future]] = []  # (kind, name, prepared weights, done)

    def attach(self, lora: Any) -> None:
        """The weight table of the loaded model (with the adapters it was loaded with)."""
        with self.lock:
            self._lora = lora

    @property
    def names(self) -> set[str]:
        with self.lock:
            return self._accepted()

    def _accepted(self) -> set[str]:
        return set() if self._lora is None else set(self._lora.names) - self._retiring

    @contextmanager
    def admitting(self, adapter: Optional[str]) -> Iterator[None]:
        """Hold the lock while a request for ``adapter`` is admitted; AdapterNotLoaded if it is not accepted."""
        with self.lock:
            if adapter is not None and adapter not in self._accepted():
                raise AdapterNotLoaded(f"adapter {adapter!r} is not loaded")
            yield

    def install(self, name: str, prepared: Any) -> Future:
        """Queue prepared weights for the engine thread; the future resolves once requests may use them."""
        done: Future = Future()
        with self.lock:
            self._pending.append(("install", name, prepared, done))
        return done

    def retire(self, name: str) -> Future:
        """Refuse new requests for ``name`` now; the future resolves once its last request has finished."""
        done: Future = Future()
        with self.lock:
            self._retiring.add(name)
            self._pending.append(("remove", name, None, done))
        return done

    def run_pending(self, in_use: Callable[[str], bool]) -> None:
        """On the engine thread, between steps: install what is ready; remove what no request uses any more."""
        with self.lock:
            pending, self._pending = self._pending, []
        later = []
        for kind, name, prepared, done in pending:
            if kind == "remove" and in_use(name):
                later.append((kind, name, prepared, done))
                continue
            started = time.perf_counter()
            try:
                self._swap(kind, name, prepared)
            except Exception as exc:  # noqa: BLE001 - reported to the thread that asked
                done.set_exception(exc)
                continue
            log.info("adapter %s: %s between steps in %.2f ms", name, kind, (time.perf_counter() - started) * 1000)
            done.set_result(name)
        if later:
            with self.lock:
                self._pending[:0] = later

    def _swap(self, kind: str, name: str, prepared: Any) -> None:
        """Change the weight table under the lock, so admission never sees it half changed."""
        with self.lock:
            if self._lora is None:
                raise AdapterNotLoaded("this model was loaded without LoRA support")
            if kind == "install":
                self._lora.install(name, prepared)
            else:
                self._retiring.discard(name)
                self._lora.remove(name)

    @property
    def busy(self) -> bool:
        """True while a swap waits for the engine thread."""
        with self.lock:
            return bool(self._pending)
