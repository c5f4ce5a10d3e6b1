"""Wiring at the top: settings -> the model loader -> one engine process per copy of the model -> the pool the app
serves.

Each copy's engine runs in a spawned process of its own (serve.engine.process); ``serve_engine_copy`` is that
process's entry. The front loads its own tokenizer from the model folder (``load_tokenizer``).

The engine package knows nothing of model loading; this module is where the two meet.
"""

from __future__ import annotations

import signal
from dataclasses import fields
from typing import Any, Callable, Optional

from serve.config import Settings, child_environment
from serve.engine.engine import Engine
from serve.engine.pool import EnginePool
from serve.engine.host import host_engine
from serve.engine.process import EngineProcess
from serve.engine.recovery import Recovery
from serve.engine.types import EngineConfig
from serve.log import configure_logging
from serve.loading.loader import PreparedModel, load_model, load_tokenizer, prepare_model
from serve.loading.placement import visible_devices
from serve.http.security import redact_logs, secret_values


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's share of the settings: each EngineConfig field from the setting of the same name (whose default
    is EngineConfig's), and COMPILE's cache folder."""
    limits = {
        item.name: getattr(settings, item.name) for item in fields(EngineConfig) if item.name != "compile_cache_dir"
    }
    return EngineConfig(**limits, compile_cache_dir=settings.cache_dir if settings.compile else None)


def recovery(settings: Settings) -> Recovery:
    """How the pool restarts a copy whose engine process died, and when a copy counts as stalled."""
    return Recovery(settings.engine_max_restarts, settings.engine_restart_window_s, settings.engine_stall_timeout_s)


def build_engine(
    settings: Settings,
    on_load_failure: Optional[Callable[[BaseException], None]] = None,
    on_ready: Optional[Callable[[], None]] = None,
) -> EnginePool:
    """The server's engines: the loader prepares the model and plans its placement, then one engine process per
    copy loads."""
    config = engine_config(settings)

    def make_engine(prepared: PreparedModel, index: int) -> EngineProcess:
        args = (settings, prepared.as_seen_by(index), index)
        spawning = engine_environment(settings, prepared, index)
        ranks = prepared.plan.engines[index].tensor_parallel
        stall = settings.engine_stall_timeout_s
        return EngineProcess(serve_engine_copy, args, config, stall, spawning, daemon=ranks == 1)

    return EnginePool(
        prepare=lambda: prepare_model(settings),
        plan_engines=lambda prepared: len(prepared.plan.engines),
        make_engine=make_engine,
        config=config,
        on_load_failure=on_load_failure,
        on_ready=on_ready,
        load_tokenizer=lambda prepared: load_tokenizer(settings, prepared),
        recovery=recovery(settings),
    )


def engine_environment(settings: Settings, prepared: PreparedModel, index: int) -> Callable[[], Any]:
    """The environment copy ``index``'s engine process starts in: only its own GPUs visible (CUDA_VISIBLE_DEVICES,
    set before torch is imported there), so its devices are cuda:0..k-1 and nothing of it lands on another GPU."""
    visible = visible_devices(prepared.plan.engines[index], settings.cuda_visible_devices)
    overrides = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    return lambda: child_environment(overrides)


def single_engine(settings: Settings) -> Engine:
    """One in-process engine (not started) over the model the settings name (tests and benchmarks drive it)."""
    return Engine(load=lambda: load_model(settings), config=engine_config(settings))


def serve_engine_copy(conn: Any, settings: Settings, prepared: PreparedModel, index: int) -> None:
    """The engine process's entry: load engine ``index``'s copy and serve the front over ``conn``.

    Ctrl-C and a SIGTERM to the whole process group reach it too; it ignores both: the worker stops its engine after
    its drain (or the closed pipe does, when the worker dies)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(settings.log_level)
    redact_logs(secret_values(settings))
    host_engine(conn, lambda: load_model(settings, prepared, index), engine_config(settings))
