"""Wiring at the top: settings -> the model loader -> one engine per copy of the model -> the pool the app serves.

The engine package knows nothing of model loading; this module is where the two meet.
"""

from __future__ import annotations

from typing import Callable, Optional

from serve.config import Settings
from serve.engine.engine import Engine
from serve.engine.pool import EnginePool
from serve.engine.types import EngineConfig
from serve.model.loader import PreparedModel, load_model, prepare_model


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's share of the settings."""
    return EngineConfig(
        max_concurrent_requests=settings.max_concurrent_requests,
        max_total_tokens=settings.max_total_tokens,
        max_input_tokens=settings.max_input_tokens,
        max_batch_total_tokens=settings.max_batch_total_tokens,
        max_batch_prefill_tokens=settings.max_batch_prefill_tokens,
        max_batch_size=settings.max_batch_size,
        kv_block_size=settings.kv_block_size,
        enable_prefix_caching=settings.enable_prefix_caching,
        cuda_graphs=settings.cuda_graphs,
        compile_cache_dir=settings.cache_dir if settings.compile else None,
    )


def build_engine(
    settings: Settings,
    on_load_failure: Optional[Callable[[BaseException], None]] = None,
    on_ready: Optional[Callable[[], None]] = None,
) -> EnginePool:
    """The server's engines: the loader prepares the model and plans its placement, then one engine per copy loads."""
    config = engine_config(settings)

    def make_engine(prepared: PreparedModel, index: int) -> Engine:
        return Engine(load=lambda: load_model(settings, prepared, index), config=config)

    return EnginePool(
        prepare=lambda: prepare_model(settings),
        plan_engines=lambda prepared: len(prepared.plan.engines),
        make_engine=make_engine,
        config=config,
        on_load_failure=on_load_failure,
        on_ready=on_ready,
    )


def single_engine(settings: Settings) -> Engine:
    """One engine (not started) over the model the settings name."""
    return Engine(load=lambda: load_model(settings), config=engine_config(settings))
