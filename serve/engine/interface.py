"""The one interface the serving side uses of an engine, whether it is one ``Engine`` or an ``EnginePool`` of them.

Routes, the generation service, metrics, sessions, the adapter registry and shutdown all talk to an
``EngineClient``; none of them asks which kind they hold.
"""

from __future__ import annotations

import queue
from typing import Any, Optional, Protocol

from serve.engine.engine import Engine, RequestStream
from serve.engine.types import EngineConfig, EngineLoad, EngineStats, Limits, Request


class EngineClient(Protocol):
    """Submit and cancel requests, know when the model is ready, its limits and tokenizer, and how loaded it is."""

    config: EngineConfig
    load_error: Optional[BaseException]

    def start(self) -> "EngineClient": ...

    def wait_ready(self, timeout: Optional[float] = None) -> bool: ...

    def stop(self, timeout: float = 5.0) -> None: ...

    @property
    def ready(self) -> bool: ...

    @property
    def loaded(self) -> Any:
        """What the load function returned (model, tokenizer, name, dtype, device, placement plan)."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def grammars(self) -> Any: ...

    @property
    def limits(self) -> Optional[Limits]: ...

    @property
    def engines(self) -> list[Engine]:
        """Each copy of the model (a pool's engines; a lone engine is its own only copy)."""

    @property
    def in_flight(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    @property
    def running(self) -> int: ...

    def stats(self) -> EngineStats: ...

    def submit(self, request: Request, sink: Optional[queue.Queue] = None, index: int = 0) -> RequestStream: ...

    def cancel(self, request_id: str) -> None: ...

    def close_session(self, session_id: str) -> None: ...

    def describe(self) -> list[EngineLoad]: ...
