"""Load one copy of the model as N tensor-parallel shards: rank 0 in the engine process, ranks 1..N-1 in processes
it spawns, joined in a torch.distributed process group the engine makes itself (no torchrun): NCCL on CUDA, gloo
on the CPU.

Each rank reads only its slices of the safetensors checkpoint (serve.modeling.parallel) onto its own device
(``cuda:<rank>`` among the copy's GPUs, which are all the engine process sees), packs its CPU weights, attaches the
adapters' shares, then ranks 1..N-1 serve rank 0's step commands (serve.engine.ranks).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from datetime import timedelta
from typing import Any

from serve.config import Settings
from serve.engine.ranks import RankGroup, rank_runner, serve_rank
from serve.loading.placement import Sharding
from serve.loading.source import ModelLoadError

log = logging.getLogger(__name__)

RENDEZVOUS_HOST = "127.0.0.1"  # the ranks of a copy share one host
RANK_POLL_S = 0.1  # how often rank 0 checks that the others are alive while they load
RANK_LOAD_TIMEOUT_S = 1800.0  # loading a shard may take long (a dead rank is seen at once: its process is polled)
NO_TIMEOUT_S = 7 * 24 * 3600.0  # TENSOR_PARALLEL_TIMEOUT_S=0: collectives wait (practically) forever
MAX_RANKS = 64


def rank_device(devices: tuple[str, ...], rank: int) -> str:
    """Rank ``rank``'s device: its GPU of the copy, or the CPU."""
    return devices[rank] if devices[0] != "cpu" else "cpu"


def _timeout(settings: Settings) -> timedelta:
    return timedelta(seconds=settings.tensor_parallel_timeout_s or NO_TIMEOUT_S)


def join_group(store: Any, rank: int, size: int, device: str, timeout: timedelta) -> None:
    """Join the copy's process group as ``rank`` through the rendezvous ``store`` (NCCL on a GPU, gloo on the CPU)."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))  # before NCCL makes its communicator on the current device
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)


def cpu_threads_per_rank(requested: int | None, size: int) -> int:
    """Torch threads of each rank on the CPU: TORCH_THREADS, else the cores shared out between the ranks."""
    return requested or max(1, len(os.sched_getaffinity(0)) // size)


def spawn_ranks(settings: Settings, prepared: Any, engine_index: int, port: int) -> RankGroup:
    """Start ranks 1..N-1 of the copy (each loads its shard, then joins the group at ``port``)."""
    context = multiprocessing.get_context("spawn")
    workers = []
    for rank in range(1, prepared.plan.engines[engine_index].tensor_parallel):
        conn, child_end = context.Pipe(duplex=True)
        args = (child_end, settings, prepared, engine_index, rank, port)
        process = context.Process(target=serve_shard_rank, args=args, name=f"tp-rank-{rank}", daemon=True)
        process.start()
        child_end.close()
        workers.append((process, conn))
    return RankGroup(workers)


def serve_shard_rank(conn: Any, settings: Settings, prepared: Any, engine_index: int, rank: int, port: int) -> None:
    """A rank process's entry: load this rank's shard, say so, join the group, then run rank 0's commands."""
    import torch.distributed as dist

    from serve.log import configure_logging
    from serve.modeling.parallel import TensorParallel

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the engine process (rank 0) decides when ranks stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(settings.log_level)
    placement = prepared.plan.engines[engine_index]
    size, device = placement.tensor_parallel, rank_device(placement.devices, rank)
    threads = cpu_threads_per_rank(settings.torch_threads, size) if device == "cpu" else None
    model = load_shard(settings, prepared, device, TensorParallel(rank, size), threads)
    store = dist.TCPStore(RENDEZVOUS_HOST, port, size, is_master=False, timeout=_timeout(settings))
    store.set(f"loaded/{rank}", "1")
    join_group(store, rank, size, device, _timeout(settings))
    log.info("tensor-parallel rank %d of %d ready on %s", rank, size, device)
    serve_rank(conn, model, rank_runner(threads))


def _await_ranks(store: Any, ranks: RankGroup, timeout: timedelta) -> None:
    """Wait until every other rank has loaded its shard; ModelLoadError naming a rank that died meanwhile."""
    started = time.monotonic()
    deadline = started + max(timeout.total_seconds(), RANK_LOAD_TIMEOUT_S)
    keys = [f"loaded/{rank}" for rank in range(1, ranks.size)]
    while not store.check(keys):
        gone = ranks.failed_rank()
        if gone is not None:
            raise ModelLoadError(f"{gone} while loading its shard")
        if time.monotonic() > deadline:
            raise ModelLoadError(f"tensor-parallel ranks did not load within {deadline - started:g} s")
        time.sleep(RANK_POLL_S)


def load_parallel(settings: Settings, prepared: Any, engine_index: int) -> tuple[Any, RankGroup, int | None]:
    """Rank 0's shard, with the other ranks started, loaded and joined: (model, ranks, rank 0's CPU threads)."""
    import torch.distributed as dist

    from serve.modeling.parallel import TensorParallel

    placement = prepared.plan.engines[engine_index]
    size, device = placement.tensor_parallel, rank_device(placement.devices, 0)
    threads = cpu_threads_per_rank(settings.torch_threads, size) if device == "cpu" else None
    store = dist.TCPStore(RENDEZVOUS_HOST, 0, size, is_master=True, timeout=_timeout(settings), wait_for_workers=False)
    ranks = spawn_ranks(settings, prepared, engine_index, store.port)
    try:
        model = load_shard(settings, prepared, device, TensorParallel(0, size), threads)
        _await_ranks(store, ranks, _timeout(settings))
        join_group(store, 0, size, device, _timeout(settings))
    except BaseException:
        ranks.stop()
        raise
    backend = "NCCL" if device.startswith("cuda") else "gloo"
    log.info("tensor parallel: %d ranks on %s (%s)", size, ", ".join(placement.devices), backend)
    return model, ranks, threads


def load_shard(settings: Settings, prepared: Any, device: str, parallel: Any, threads: int | None) -> Any:
    """This rank's shard of the lean model on ``device``: the checkpoint's slices (or seeded random weights under
    HF_MODEL_LOAD_FORMAT=dummy), CPU weights packed, the adapters' shares attached."""
    import torch
    from transformers import AutoConfig

    from serve.engine.lora import AdapterError, attach_adapters
    from serve.loading.cpu_weights import pack_cpu_weights
    from serve.modeling import CheckpointMismatch, LlamaForServing, load_pretrained

    if threads is not None:
        torch.set_num_threads(threads)
    config = AutoConfig.from_pretrained(str(prepared.folder), trust_remote_code=settings.trust_remote_code)
    try:
        if settings.load_format == "dummy":
            torch.manual_seed(parallel.rank)
            model = LlamaForServing.from_config(config, device, prepared.dtype, parallel)
        else:
            model = load_pretrained(prepared.folder, config, device, prepared.dtype, parallel)
    except CheckpointMismatch as exc:
        raise ModelLoadError(f"tensor-parallel rank {parallel.rank}: the checkpoint does not fit: {exc}") from exc
    if device == "cpu":
        model.serve_cpu_weights = pack_cpu_weights(model, settings)
    try:
        attach_adapters(model, prepared.adapters, settings.max_lora_rank)
    except AdapterError as exc:
        raise ModelLoadError(str(exc)) from exc
    return model


def sharding_of(settings: Settings, config: Any, folder: Any, quantized: bool) -> Sharding:
    """How the lean model can split this model (serve.loading.placement.Sharding): the rank counts that divide its
    heads and features, or why tensor parallelism is out (then PLACEMENT=auto keeps accelerate's split)."""
    from serve.modeling import safetensors_files, unsupported_reason
    from serve.modeling.parallel import shard_sizes

    why_not = unsupported_reason(config)
    if not settings.lean_model:
        why_not = "LEAN_MODEL=false"
    elif quantized:
        why_not = "a quantized model is loaded by transformers"
    elif settings.trust_remote_code and getattr(config, "auto_map", None):
        why_not = "the checkpoint brings its own model code"
    elif settings.load_format != "dummy" and not safetensors_files(folder):
        why_not = "the lean loader reads safetensors weights only"
    if why_not is not None:
        return Sharding(why_not=why_not)
    return Sharding(shard_sizes(config, MAX_RANKS))
