"""How much memory the KV cache may take: on CUDA, measured from a dummy step of the widest shape (vLLM's rule).

Before the pool is allocated, the engine runs the widest step it will ever plan (MAX_BATCH_PREFILL_TOKENS prompt
tokens attending over a full-length prefix beside the widest decode batch) over a two-block temporary cache, and
reads the peak memory it allocated; then the widest decode-only step, whose activations a CUDA graphs' pool keeps.
The cache gets, on each GPU:

    total x GPU_MEMORY_UTILIZATION - in use (weights, the CUDA context, others) - peak step - graph reserve

spread over the layers that GPU holds (the tightest GPU sets the size); each term is logged. MAX_BATCH_TOTAL_TOKENS,
when set, overrides the measurement (nothing is run). On the CPU, and under tensor parallelism (the dummy step
would need every rank), the cache takes what ``default_cache_bytes`` allows, as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from serve.engine.kv_cache import CacheShape, PagedKVCache, default_cache_bytes
from serve.engine.step_inputs import StepInputs
from serve.engine.types import EngineConfig, prefill_token_budget

log = logging.getLogger(__name__)

GIB = 1024**3
GRAPH_OVERHEAD_BYTES = 256 * 1024**2  # beyond the widest decode's activations: graphs' own buffers, allocator slack


class KVCacheTooSmall(ValueError):
    """The memory left for the KV cache does not hold one full-length sequence."""


@dataclass(frozen=True)
class DeviceBudget:
    """One GPU's memory terms, in bytes, and the KV layers it holds."""

    device: str
    total: int  # the GPU's memory
    in_use: int  # taken before the dummy step: weights, the CUDA context, other processes
    peak_step: int  # the widest step's activations, above what was allocated before it
    graph_reserve: int  # kept back for the CUDA graphs' memory pool (0 without CUDA graphs)
    layers: int  # KV layers on this GPU

    def room(self, utilization: float) -> int:
        """Bytes left for this GPU's share of the cache."""
        return int(self.total * utilization) - self.in_use - self.peak_step - self.graph_reserve


def cache_bytes_for(budgets: Sequence[DeviceBudget], utilization: float, layers: int) -> int:
    """Bytes the whole cache (``layers`` layers) may take: each GPU's room spread over the layers it holds; the
    tightest GPU sets the size (0 when one has no room left)."""
    sizes = []
    for budget in budgets:
        room = budget.room(utilization)
        log.info(
            "KV cache memory on %s: %.2f GiB x %.2f (GPU_MEMORY_UTILIZATION) - %.2f GiB in use (weights and other) "
            "- %.2f GiB peak step - %.2f GiB graph reserve = %.2f GiB for %d of %d layers",
            budget.device, budget.total / GIB, utilization, budget.in_use / GIB, budget.peak_step / GIB,
            budget.graph_reserve / GIB, room / GIB, budget.layers, layers,
        )  # fmt: skip
        sizes.append(max(room, 0) * layers // budget.layers)
    return min(sizes)


def check_room(cache_bytes: int, shape: CacheShape, min_tokens: int, config: EngineConfig) -> None:
    """Fail the load when the measured room holds less than one full-length sequence, naming what to change."""
    tokens = cache_bytes // shape.bytes_per_token
    if tokens >= min_tokens:
        return
    raise KVCacheTooSmall(
        f"the KV cache would hold {tokens} tokens, fewer than one full-length sequence ({min_tokens}): raise "
        f"GPU_MEMORY_UTILIZATION (now {config.gpu_memory_utilization:g}), lower MAX_TOTAL_TOKENS or "
        f"MAX_BATCH_PREFILL_TOKENS (now {config.max_batch_prefill_tokens}), set KV_CACHE_DTYPE=fp8 (now "
        f"{config.kv_cache_dtype}), or set MAX_BATCH_TOTAL_TOKENS to size the cache yourself"
    )


def widest_step(max_batch: int, width: int, block_size: int, prefill_tokens: int, total: int) -> StepInputs:
    """The widest step the scheduler may plan, reading and writing only the scratch block: ``max_batch`` decode
    rows over ``width`` blocks each, and one prompt chunk of ``prefill_tokens`` after a full-length prefix."""
    chunk = min(prefill_tokens, total)
    before = total - chunk  # tokens cached before the chunk: the longest prefix it can attend over
    positions = [total - 1] * max_batch + list(range(before, total))
    return StepInputs(
        ids=[0] * len(positions),
        positions=positions,
        rows=[position % block_size for position in positions],  # the scratch block's rows only
        decode_tables=[[0] * width for _ in range(max_batch)],
        decode_lengths=[total] * max_batch,
        chunks=[(max_batch, max_batch + chunk, before, [0] * width)],
        logit_rows=list(range(max_batch)) + [max_batch + chunk - 1],
    )


def cache_room(
    model: Any, shape: CacheShape, devices: list[torch.device], config: EngineConfig, total: int, max_batch: int,
    ranks: Any = None, share: float = 1.0,
) -> int:  # fmt: skip
    """Bytes this cache may take: measured on CUDA (one process, no override), else as ``default_cache_bytes``;
    ``share``: its part of that room when a draft model's cache takes the rest (checked after the split)."""
    if devices[0].type != "cuda":
        return int(default_cache_bytes(devices) * share) // (ranks.size if ranks is not None else 1)
    if config.max_batch_total_tokens:
        return 0  # MAX_BATCH_TOTAL_TOKENS sizes the pool: nothing to measure
    if ranks is not None:
        log.info("KV cache memory: tensor parallel, no dummy step (it needs every rank): 85%% of free memory")
        return int(default_cache_bytes(devices) * share)
    width = -(-total // config.kv_block_size)
    budgets = profile_devices(model, shape, devices, config, (max_batch, width, total))
    room = int(cache_bytes_for(budgets, config.gpu_memory_utilization, shape.layers) * share)
    check_room(room, shape, total + config.kv_block_size, config)
    return room


def profile_devices(
    model: Any,
    shape: CacheShape,
    devices: list[torch.device],
    config: EngineConfig,
    widest: tuple[int, int, int],
    memory: Any = None,
) -> list[DeviceBudget]:
    """Each GPU's budget terms from the dummy steps (``widest``: max batch, table width, total tokens) over a
    two-block temporary cache with the serving kernels; ``memory``: ``torch.cuda`` (a fake in the CPU tests)."""
    from serve.engine.decode_backends import install_decode_backend
    from serve.engine.runner import ModelRunner

    memory = memory or torch.cuda
    max_batch, width, total = widest
    gpus = list(dict.fromkeys(devices))
    in_use = {gpu: _in_use(memory, gpu) for gpu in gpus}
    scratch = PagedKVCache(shape, 2, config.kv_block_size, devices)
    install_decode_backend(scratch, config.attention_backend, config.c_compiler)
    runner = ModelRunner(model, scratch, None, max_batch, width)
    prefill = prefill_token_budget(config.max_batch_prefill_tokens, devices[0])  # unset: the GPU default
    step = widest_step(max_batch, width, config.kv_block_size, prefill, total)
    peak = _peaks(memory, gpus, lambda: runner.forward(step).float().log_softmax(-1))
    graphs = {gpu: 0 for gpu in gpus}
    if config.cuda_graphs:  # the widest decode-only step: what the graphs' pool will keep
        graphs = _peaks(memory, gpus, lambda: _widest_decode(runner, max_batch, width, total))
        graphs = {gpu: value + GRAPH_OVERHEAD_BYTES for gpu, value in graphs.items()}
        if hasattr(model, "layer_halves"):  # the piecewise halves' pool keeps about the widest step's activations
            graphs = {gpu: value + peak[gpu] for gpu, value in graphs.items()}
    memory.empty_cache()
    return [
        DeviceBudget(str(gpu), memory.mem_get_info(gpu)[1], in_use[gpu], peak[gpu], graphs[gpu], devices.count(gpu))
        for gpu in gpus
    ]


def _widest_decode(runner: Any, max_batch: int, width: int, total: int) -> torch.Tensor:
    """The decode-only step a CUDA graph captures at the widest shape (scratch block only)."""
    runner.static.load([(0, total - 1, [0] * width)] * max_batch, (max_batch, width))
    return runner.static.run(max_batch, width)


def _in_use(memory: Any, gpu: torch.device) -> int:
    """Bytes taken on ``gpu`` before the dummy steps (by anything: this process's weights, the context, others)."""
    memory.synchronize(gpu)
    memory.empty_cache()
    free, total = memory.mem_get_info(gpu)
    return total - free


def _peaks(memory: Any, gpus: list[torch.device], run: Callable[[], Optional[object]]) -> dict[torch.device, int]:
    """Bytes ``run`` allocated at its peak on each GPU, above what was allocated before it."""
    before = {}
    for gpu in gpus:
        memory.synchronize(gpu)
        memory.reset_peak_memory_stats(gpu)
        before[gpu] = memory.memory_allocated(gpu)
    with torch.inference_mode():
        run()
    for gpu in gpus:
        memory.synchronize(gpu)
    return {gpu: max(memory.max_memory_allocated(gpu) - before[gpu], 0) for gpu in gpus}
