"""CUDA graphs for the decode shapes of StaticDecode, captured once at start-up and self-checked.

Each (batch bucket, width bucket) is captured largest first into one shared memory pool. Before serving, a probe
batch is run eagerly and replayed from its graph; any capture error or a mismatch turns graphs off with the reason
logged, so the server still serves (eagerly) rather than serve wrong tokens. Nothing here runs without CUDA.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from serve.engine.static_decode import StaticDecode

log = logging.getLogger(__name__)

WARMUP_RUNS = 2
PROBE_TOLERANCE = 1e-2  # relative: graph replay and eager run the same kernels on the same inputs


@dataclass
class GraphReport:
    """What start-up did about CUDA graphs (shown in /info)."""

    enabled: bool = False
    reason: str = ""
    shapes: list[tuple[int, int]] = field(default_factory=list)
    capture_seconds: float = 0.0
    probe_error: Optional[float] = None


def capture_decode_graphs(static: StaticDecode) -> GraphReport:
    """Capture every decode shape and self-check one; on any failure leave ``static`` eager and say why."""
    if static.device.type != "cuda":
        return GraphReport(reason=f"no CUDA device ({static.device.type}): decode runs eagerly")
    started = time.monotonic()
    shapes = sorted(((b, w) for b in static.batches for w in static.widths), reverse=True)
    try:
        with torch.inference_mode(), torch.cuda.device(static.device):  # the model's GPU, whatever is current
            _capture_all(static, shapes)
            error = _self_check(static, min(shapes))
    except Exception as exc:  # noqa: BLE001 - any capture failure means: serve eagerly
        static.replay.clear()
        log.warning("CUDA graphs off: capture failed (%s: %s); decode runs eagerly", type(exc).__name__, exc)
        return GraphReport(reason=f"capture failed: {type(exc).__name__}: {exc}")
    seconds = time.monotonic() - started
    if error > PROBE_TOLERANCE:
        static.replay.clear()
        log.warning("CUDA graphs off: replay differs from eager by %.3g (relative); decode runs eagerly", error)
        return GraphReport(reason=f"self-check failed: relative error {error:.3g}", probe_error=error)
    log.info("CUDA graphs: %d decode shapes captured in %.1f s (self-check error %.2g)", len(shapes), seconds, error)
    return GraphReport(True, "captured", shapes, round(seconds, 2), error)


def _capture_all(static: StaticDecode, shapes: list[tuple[int, int]]) -> None:
    pool = None
    for batch, width in shapes:
        static.load_probe(batch, width)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                static.run(batch, width)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            output = static.run(batch, width)
        pool = graph.pool()
        static.replay[(batch, width)] = _replayer(graph, output)


def _replayer(graph: Any, output: torch.Tensor) -> Any:
    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


def _self_check(static: StaticDecode, shape: tuple[int, int]) -> float:
    """Relative difference between eager and replayed logits on a random probe batch."""
    batch, width = shape
    static.load_probe(batch, width, torch.Generator().manual_seed(0))
    eager = static.run(batch, width).float().clone()
    replayed = static.forward(batch, width).float()
    torch.cuda.synchronize()
    return float((replayed - eager).norm() / eager.norm().clamp_min(1e-6))
