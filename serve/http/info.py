"""The body of TGI's ``/info``: the model, its placement and limits, each engine's load, and the server's settings."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Iterable

import serve
from serve.config import Settings
from serve.engine.interface import EngineClient
from serve.engine.speculative import speculative_description
from serve.front.chat_output import model_output_format
from serve.front.images import image_prompt_of


def info_body(engine: EngineClient, settings: Settings, adapters: Iterable[str]) -> dict[str, Any]:
    """What /info answers; the model's fields are null until it has loaded."""
    body: dict[str, Any] = {"model_id": None}
    if engine.ready:
        body.update(_model_info(engine, adapters))
        chat_output = model_output_format(engine.tokenizer, settings)
        body.update(reasoning_parser=chat_output.reasoning_parser, tool_call_parser=chat_output.tool_call_parser)
        body.update(takes_images=image_prompt_of(engine.tokenizer) is not None)  # image_url parts in chat messages
    prefill_tokens = engine.limits.max_batch_prefill_tokens if engine.ready else engine.config.max_batch_prefill_tokens
    body.update(
        {
            "max_concurrent_requests": settings.max_concurrent_requests,
            "max_batch_prefill_tokens": prefill_tokens,  # unset: decided by the model's device at load
            "speculative": speculative_description(engine.config),  # SPECULATIVE: off, or what proposes and how much
            "messages_api_enabled": settings.messages_api_enabled,
            "router": "sagemaker-llm-serve",
            "version": serve.__version__,
        }
    )
    return body


def _model_info(engine: EngineClient, adapters: Iterable[str]) -> dict[str, Any]:
    """The loaded model: name, dtype, device, placement, quantization, CPU weight layout, CUDA graphs, COMPILE,
    decode attention, async scheduling, engines, limits."""
    loaded = engine.loaded
    plan = getattr(loaded, "plan", None)
    loads = engine.describe()
    graphs = loads[0].graphs if loads else None
    compiled = loads[0].compiled if loads else None
    attention = loads[0].attention if loads else None
    ahead = loads[0].ahead if loads else None
    kv_dtype = "float8_e4m3fn" if engine.config.kv_cache_dtype == "fp8" else str(loaded.dtype).replace("torch.", "")
    return {
        "model_id": loaded.name,
        "model_dtype": str(loaded.dtype).replace("torch.", ""),
        "kv_cache_dtype": kv_dtype,  # KV_CACHE_DTYPE: what the KV cache stores (auto: the model's dtype)
        "model_device_type": loaded.device.type,
        "placement": plan.describe() if plan is not None else None,
        "devices": list(plan.devices) if plan is not None else [str(loaded.device)],
        "quantization": getattr(loaded, "quantization", None),
        "cpu_weights": getattr(loaded, "cpu_weights", None),  # the CPU kernel or dense, and why (None: on a GPU)
        "adapters": list(adapters),  # those loaded at start and those registered at run time
        "cuda_graphs": asdict(graphs) if graphs is not None else None,
        "compile": asdict(compiled) if compiled is not None else None,
        "attention": asdict(attention) if attention is not None else None,  # decode attention's backend and why
        "async_scheduling": asdict(ahead) if ahead is not None else None,  # whether the host works ahead, and why
        "engines": [
            {
                "devices": list(plan.engines[index].devices) if plan is not None else [str(loaded.device)],
                "in_flight": load.in_flight,
                "served": load.served,
            }
            for index, load in enumerate(loads)
        ],
        **asdict(engine.limits),
    }
