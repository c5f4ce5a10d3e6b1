"""The generation engine: owns the model on one background thread; knows nothing of HTTP."""

from serve.engine.engine import Engine, EngineNotReady, EngineOverloaded, RequestStream
from serve.engine.types import FinishReason, Request, SamplingParams, Timings, TokenEvent

__all__ = [
    "Engine",
    "EngineNotReady",
    "EngineOverloaded",
    "FinishReason",
    "Request",
    "RequestStream",
    "SamplingParams",
    "Timings",
    "TokenEvent",
]
