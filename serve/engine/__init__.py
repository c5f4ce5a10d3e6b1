"""The generation engine: owns the model on one background thread; knows nothing of HTTP."""

from serve.engine.engine import Engine, EngineNotReady
from serve.engine.stream import RequestStream
from serve.engine.pool import EngineOverloaded
from serve.engine.types import EngineConfig, FinishReason, Request, SamplingParams, Timings, TokenEvent

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineNotReady",
    "EngineOverloaded",
    "FinishReason",
    "Request",
    "RequestStream",
    "SamplingParams",
    "Timings",
    "TokenEvent",
]
