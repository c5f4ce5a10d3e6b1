"""Tensor-parallel ranks 1..N-1: processes that hold the other shards of the model and run every forward with rank 0.

Rank 0 is the engine process: it schedules, lays out each step and samples; the scheduler, the block manager, the
sessions and the prefix cache exist there alone. Before each forward, rank 0 sends the step's inputs to every other
rank in one message over that rank's pipe (``RankGroup``); each rank runs the same forward over its own shard and
KV cache (its own KV heads), meeting the others in the model's all-reduces (``serve_rank``). A rank that died fails
rank 0's next step with a ``RankFailure`` naming it; a rank that hangs fails the collective that waits for it
(the process group's timeout). Either way the engine stops serving and its in-flight requests end with an error.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

from serve.engine.step_inputs import StepInputs

log = logging.getLogger(__name__)

STOP_WAIT_S = 5.0


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or stopped answering: the engine cannot run another step."""


@dataclass(frozen=True)
class BuildCache:
    """Rank 0 sized the KV pool: every rank allocates the same blocks for its own KV heads."""

    num_blocks: int
    block_size: int
    max_batch: int
    max_blocks: int
    attention_backend: str = "auto"  # the decode kernel rank 0 chose (serve.engine.decode_backends)
    c_compiler: Optional[str] = None
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPE: every rank stores what rank 0 stores


@dataclass(frozen=True)
class RunStep:
    """Run the forward of one laid-out step (prompt chunks, or decode rows with an adapter)."""

    inputs: StepInputs


@dataclass(frozen=True)
class RunDecode:
    """Run a decode-only step over a fixed shape (a CUDA graph's replay where one was captured)."""

    rows: list[tuple[int, int, list[int]]]
    shape: tuple[int, int]
    fed: list[tuple[int, int]] = ()  # rows whose token ids rank 0 broadcasts (ASYNC_SCHEDULING: still on its device)


@dataclass(frozen=True)
class CaptureGraphs:
    """Capture the decode shapes as rank 0 does (collectives inside the graphs need every rank capturing)."""


@dataclass(frozen=True)
class InstallAdapter:
    """Install a LoRA adapter's unsharded weights (serve.engine.lora.AdapterWeights); each rank takes its share."""

    name: str
    weights: Any


@dataclass(frozen=True)
class RemoveAdapter:
    name: str


@dataclass(frozen=True)
class StopRank:
    """Leave the command loop."""


class RankGroup:
    """Rank 0's handle on the other ranks: one pipe and one process each (rank = position + 1)."""

    def __init__(self, workers: list[tuple[Any, Any]]):
        self.workers = workers  # (process, connection) per rank 1..N-1
        self._lock = threading.Lock()  # the engine thread and an adapter install may send at once
        self._stop_lock, self._stopped = threading.Lock(), False

    @property
    def size(self) -> int:
        """Ranks in the group, rank 0 included."""
        return len(self.workers) + 1

    def send(self, message: object) -> None:
        """``message`` to every other rank (no liveness check per step: a send to a dead rank fails, and so does the
        collective that waits for it); RankFailure naming the rank that is gone."""
        with self._lock:
            for rank, (process, conn) in enumerate(self.workers, 1):
                try:
                    conn.send(message)  # a dead rank's pipe is broken (its end closed with it)
                except (OSError, ValueError) as exc:
                    gone = self.failed_rank() or f"tensor-parallel rank {rank} (pid {process.pid}) is unreachable"
                    raise RankFailure(f"{gone}: {exc}") from exc

    def send_step(self, inputs: StepInputs) -> None:
        self.send(RunStep(inputs))

    def send_decode(
        self, rows: list[tuple[int, int, list[int]]], shape: tuple[int, int], fed: list[tuple[int, int]] = ()
    ) -> None:
        self.send(RunDecode(rows, shape, fed))

    def send_capture(self) -> None:
        self.send(CaptureGraphs())

    def send_adapter(self, name: str, weights: Any) -> None:
        self.send(InstallAdapter(name, weights))

    def send_adapter_removal(self, name: str) -> None:
        self.send(RemoveAdapter(name))

    def failed_rank(self) -> Optional[str]:
        """Which rank is gone, if one is (for the log line of a step that failed)."""
        for rank, (process, _) in enumerate(self.workers, 1):
            if not process.is_alive():
                return f"tensor-parallel rank {rank} (pid {process.pid}) exited (code {process.exitcode})"
        return None

    def stop(self) -> None:
        """Tell every rank to leave, make sure each process is gone, and leave the process group (idempotent: the
        engine thread and ``Engine.stop`` may both call it)."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            self._stop_all()

    def _stop_all(self) -> None:
        try:
            self.send(StopRank())
        except RankFailure:
            pass
        for process, conn in self.workers:
            process.join(STOP_WAIT_S)
            if process.is_alive():
                process.kill()
                process.join(STOP_WAIT_S)
            conn.close()
        _leave_group()


def _leave_group() -> None:
    """Rank 0 leaves the copy's process group (an engine made again in this process forms a new one)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def serve_rank(conn: Any, model: Any, make_runner: Callable[[Any, BuildCache], Any]) -> None:
    """A rank's command loop over its shard ``model``: build the runner when rank 0 has sized the cache, then run
    every forward rank 0 sends, until told to stop or rank 0 is gone."""
    runner = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            log.info("tensor-parallel rank: rank 0 is gone; leaving")
            return
        if isinstance(message, StopRank):
            return
        if isinstance(message, BuildCache):
            runner = make_runner(model, message)
            continue
        _run(runner, message)


def _run(runner: Any, message: object) -> None:
    """One of rank 0's commands on this rank's runner (built by BuildCache, which always comes first)."""
    if isinstance(message, RunStep):
        runner.forward(message.inputs)
    elif isinstance(message, RunDecode):
        if runner.lora is not None:
            runner.lora.begin_step([])
        runner.static.load(message.rows, message.shape)
        runner.feed_pending(runner.static.inputs, message.fed, None)  # rank 0's broadcast of the ids it holds on device
        runner.static.forward(*message.shape)
    elif isinstance(message, CaptureGraphs):
        runner.capture_graphs()
    elif isinstance(message, InstallAdapter):
        from serve.engine.lora import prepare_adapter

        runner.lora.install(message.name, prepare_adapter(runner.model, message.name, message.weights))
    elif isinstance(message, RemoveAdapter):
        runner.lora.remove(message.name)
    else:
        log.error("tensor-parallel rank: unknown command %r", type(message).__name__)


def rank_runner(cpu_threads: Optional[int]) -> Callable[[Any, BuildCache], Any]:
    """How a rank builds its runner once rank 0 sized the pool: the same blocks, for this rank's KV heads."""

    def build(model: Any, message: BuildCache) -> Any:
        from serve.engine.decode_backends import install_decode_backend
        from serve.engine.kv_cache import CacheShape, PagedKVCache, storage_dtype
        from serve.engine.runner import ModelRunner

        dtype = storage_dtype(message.kv_cache_dtype, model.dtype)
        shape = CacheShape.of(model.config, dtype, getattr(model, "serve_kv_heads", None))
        cache = PagedKVCache(shape, message.num_blocks, message.block_size, model.device)
        install_decode_backend(cache, message.attention_backend, message.c_compiler)
        return ModelRunner(model, cache, None, message.max_batch, message.max_blocks, cpu_threads)

    return build
