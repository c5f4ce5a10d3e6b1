"""The messages between the front (an HTTP worker) and an engine process: one dataclass per kind of message.

Front -> core: ``Submit``, ``Cancel``, ``CloseSession``, ``InstallAdapter``, ``RetireAdapter``, ``Stop``.
Core -> front: ``Ready`` (once loaded), ``Failed`` (the load failed), ``Events`` (all the events of one engine step,
with the engine's counters), ``CallDone`` (an adapter install or retire finished).

Each side decodes what it receives in one place: ``dispatch`` with a table from message type to handler. A message
of a type the table does not hold is logged as an error, never dropped in silence. No torch here: the front imports
this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

from serve.engine.types import EngineLoad, EngineStats, Limits, Request, TokenEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submit:
    """Admit ``request``; its events come back tagged with ``key``."""

    key: int
    request: Request


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class CloseSession:
    session_id: str


@dataclass(frozen=True)
class InstallAdapter:
    """Read the peft folder ``folder`` as adapter ``name`` and link it in; ``number`` is its install number (what
    the prefix cache keys its blocks by), given by the front's adapter registry."""

    call: int
    name: str
    number: int
    folder: str
    max_rank: Optional[int] = None


@dataclass(frozen=True)
class RetireAdapter:
    """Refuse new requests for ``name``; answered once its last request finished and its weights are gone."""

    call: int
    name: str


@dataclass(frozen=True)
class Stop:
    """Stop the engine and end the process."""


@dataclass(frozen=True)
class DeviceName:
    """A device as the front describes it (no torch in the front): its type (``cpu``, ``cuda``) and full name."""

    type: str
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class ModelView:
    """The model as the front sees it: its transformers config, not its weights."""

    config: Any


@dataclass(frozen=True)
class ModelCard:
    """What the front knows of the loaded model (``EngineClient.loaded``): everything but weights and tokenizer."""

    name: str
    model: ModelView
    device: DeviceName
    dtype: str
    plan: Any = None  # serve.loading.placement.PlacementPlan
    quantization: Optional[str] = None
    cpu_weights: Optional[str] = None
    adapters: dict[str, int] = field(default_factory=dict)  # loaded at start: name -> install number


@dataclass(frozen=True)
class Ready:
    """Sent once, when the engine is ready: the model card, the engine's limits and end-of-sequence ids, and what
    start-up did about CUDA graphs and COMPILE."""

    model: ModelCard
    limits: Limits
    eos_ids: frozenset[int]
    load: EngineLoad


@dataclass(frozen=True)
class Failed:
    """The model failed to load."""

    reason: str


@dataclass(frozen=True)
class Snapshot:
    """The engine's counters, sent with every batch of events (and now and then when idle)."""

    waiting: int = 0
    running: int = 0
    stats: EngineStats = field(default_factory=EngineStats)


@dataclass(frozen=True)
class Events:
    """The events of one engine step, each tagged with its request's key, and the counters after the step."""

    events: tuple[tuple[int, TokenEvent], ...]
    snapshot: Snapshot


@dataclass(frozen=True)
class CallDone:
    """An adapter call finished: ``error`` is None on success; ``refused`` marks an adapter the core cannot serve
    (a bad folder, an unsupported config, a shape that does not fit), as opposed to a failure of the engine."""

    call: int
    error: Optional[str] = None
    refused: bool = False


ToCore = Union[Submit, Cancel, CloseSession, InstallAdapter, RetireAdapter, Stop]
ToFront = Union[Ready, Failed, Events, CallDone]


def dispatch(message: object, handlers: Mapping[type, Callable[[Any], None]], side: str) -> bool:
    """Hand ``message`` to the handler of its type; log an error (and return False) for a type ``side`` does not
    handle."""
    handler = handlers.get(type(message))
    if handler is None:
        log.error("the %s got a message it does not handle: %r", side, message)
        return False
    handler(message)
    return True
