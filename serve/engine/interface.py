"""What the serving side uses of the engines (``EngineClient``, an ``EnginePool``), what a pool needs of each copy
of the model (``EngineCopy``), and what a submitted request gives back (``Stream``).

Routes, the generation service, metrics, sessions, the adapter registry and shutdown all talk to an
``EngineClient``; an in-process ``Engine`` serves as one too (the unit and API tests drive it directly).
"""

from __future__ import annotations

import queue
from typing import Any, Iterator, Optional, Protocol

from serve.engine.types import EngineConfig, EngineLoad, EngineStats, Limits, Request, TokenEvent


class Stream(Protocol):
    """The events of one submitted request; ``close`` cancels it if it has not finished."""

    request: Request

    def events(self, heartbeat: Optional[float] = None) -> Iterator[Optional[TokenEvent]]: ...

    def __iter__(self) -> Iterator[TokenEvent]: ...

    def close(self) -> None: ...


class EngineCopy(Protocol):
    """One copy of the model, as a pool drives it: ``ready`` only while it can take requests; ``exited`` once it
    died unasked (``exit_error`` says how), until ``restart`` brings up a fresh one; ``stalled`` while it has
    requests in flight and makes no progress."""

    load_error: Optional[BaseException]
    exit_error: Optional[BaseException]

    def start(self) -> Any: ...

    def restart(self) -> bool: ...

    @property
    def exited(self) -> bool: ...

    @property
    def stalled(self) -> bool: ...

    def wait_ready(self, timeout: Optional[float] = None) -> bool: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    @property
    def ready(self) -> bool: ...

    @property
    def loaded(self) -> Any: ...

    @property
    def limits(self) -> Optional[Limits]: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def served(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    @property
    def running(self) -> int: ...

    def stats(self) -> EngineStats: ...

    def describe(self) -> list[EngineLoad]: ...

    def submit(self, request: Request, sink: Optional[queue.Queue] = None, index: int = 0) -> Stream: ...

    def cancel(self, request_id: str) -> None: ...

    def close_session(self, session_id: str) -> None: ...


class EngineClient(Protocol):
    """Submit and cancel requests, know when the model is ready, its limits and tokenizer, and how loaded it is."""

    config: EngineConfig
    load_error: Optional[BaseException]

    def start(self) -> Any: ...

    def wait_ready(self, timeout: Optional[float] = None) -> bool: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    @property
    def ready(self) -> bool: ...

    @property
    def loaded(self) -> Any:
        """The model as the front knows it: name, config, dtype, device, placement plan, quantization."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def grammars(self) -> Any:
        """Checks a grammar: ``grammars.check(text)`` raises GrammarError when it does not compile."""

    @property
    def limits(self) -> Optional[Limits]: ...

    @property
    def engines(self) -> Any:
        """Each copy of the model (a pool's copies; a lone engine is its own only copy)."""

    @property
    def in_flight(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    @property
    def running(self) -> int: ...

    def stats(self) -> EngineStats: ...

    def submit(self, request: Request, sink: Optional[queue.Queue] = None, index: int = 0) -> Stream: ...

    def cancel(self, request_id: str) -> None: ...

    def close_session(self, session_id: str) -> None: ...

    def describe(self) -> list[EngineLoad]: ...
