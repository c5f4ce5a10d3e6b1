"""CUDA graphs for the decode shapes of StaticDecode, captured once at start-up and self-checked.

Each (batch bucket, width bucket) is captured largest first into one shared memory pool. Before serving, the
narrowest and the widest shape of every batch bucket are replayed on a random probe batch and compared with an eager
run of the same shape; a shape whose replay differs (or fails) is dropped with the reason logged and decode runs it
eagerly, while the others keep their graphs. A capture error turns graphs off altogether, so the server still serves
(eagerly) rather than serve wrong tokens. Nothing here runs without CUDA.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from serve.engine.static_decode import StaticDecode

log = logging.getLogger(__name__)

WARMUP_RUNS = 2
PROBE_TOLERANCE = 1e-2  # relative: graph replay and eager run the same kernels on the same inputs

Shape = tuple[int, int]  # (batch bucket, width bucket)


@dataclass
class GraphReport:
    """What start-up did about CUDA graphs (shown in /info)."""

    enabled: bool = False
    reason: str = ""
    shapes: list[Shape] = field(default_factory=list)  # the shapes that replay a graph
    capture_seconds: float = 0.0
    probe_error: Optional[float] = None  # the largest relative error among the self-checked shapes kept
    checked: int = 0  # shapes self-checked (each batch bucket's narrowest and widest)
    dropped: list[str] = field(default_factory=list)  # "<batch>x<width>: why" for each shape that runs eagerly
    mixed: Any = None  # serve.engine.piecewise.PiecewiseReport: steps with prompt chunks, replayed piecewise


def capture_decode_graphs(static: StaticDecode) -> GraphReport:
    """Capture every decode shape and self-check each batch bucket's narrowest and widest; drop a shape that fails
    its check, and turn graphs off (with the reason) when the capture itself fails."""
    if static.device.type != "cuda":
        return GraphReport(reason=f"no CUDA device ({static.device.type}): decode runs eagerly")
    started = time.monotonic()
    shapes = sorted(((b, w) for b in static.batches for w in static.widths), reverse=True)
    try:
        with torch.inference_mode(), torch.cuda.device(static.device):  # the model's GPU, whatever is current
            _capture_all(static, shapes)
            checked = checked_shapes(static.batches, static.widths)
            errors, dropped = self_check(static, checked, _replay_error)
    except Exception as exc:  # noqa: BLE001 - any capture failure means: serve eagerly
        static.replay.clear()
        log.warning("CUDA graphs off: capture failed (%s: %s); decode runs eagerly", type(exc).__name__, exc)
        return GraphReport(reason=f"capture failed: {type(exc).__name__}: {exc}")
    return _report(static, shapes, errors, dropped, time.monotonic() - started)


def _report(
    static: StaticDecode, shapes: list[Shape], errors: dict[Shape, float], dropped: list[str], seconds: float
) -> GraphReport:
    """The report once the checks ran: graphs on for the shapes kept, off when every shape was dropped."""
    kept = [shape for shape in shapes if shape in static.replay]
    worst = max((error for shape, error in errors.items() if shape in static.replay), default=None)
    if not kept:
        log.warning("CUDA graphs off: every self-checked shape failed; decode runs eagerly")
        return GraphReport(reason="self-check failed: " + "; ".join(dropped), checked=len(errors), dropped=dropped)
    log.info(
        "CUDA graphs: %d of %d decode shapes kept, captured in %.1f s (%d self-checked, largest error %.2g)",
        len(kept), len(shapes), seconds, len(errors), worst or 0.0,
    )  # fmt: skip
    return GraphReport(True, "captured", kept, round(seconds, 2), worst, len(errors), dropped)


def checked_shapes(batches: list[int], widths: list[int]) -> list[Shape]:
    """The shapes the self-check replays: each batch bucket's narrowest and widest width."""
    narrowest, widest = min(widths), max(widths)
    return [shape for batch in batches for shape in dict.fromkeys([(batch, narrowest), (batch, widest)])]


Measure = Callable[[StaticDecode, Shape], float]


def self_check(static: Any, shapes: list[Shape], measure: Measure) -> tuple[dict[Shape, float], list[str]]:
    """Measure each shape's replay against eager (``measure``: relative error); a shape that fails, or differs by
    more than PROBE_TOLERANCE, loses its graph with the reason logged. (errors by shape, "<shape>: reason" each)."""
    errors, dropped = {}, []
    for shape in shapes:
        try:
            error = errors[shape] = measure(static, shape)
            reason = None if error <= PROBE_TOLERANCE else f"replay differs from eager by {error:.3g} (relative)"
        except Exception as exc:  # noqa: BLE001 - a replay that fails drops its shape, not the server
            errors[shape] = float("inf")
            reason = f"replay failed: {type(exc).__name__}: {exc}"
        if reason is not None:
            static.replay.pop(shape, None)
            dropped.append(f"{shape[0]}x{shape[1]}: {reason}")
            log.warning("CUDA graph of decode shape batch %d x width %d dropped (%s); it runs eagerly", *shape, reason)
    return errors, dropped


def _capture_all(static: StaticDecode, shapes: list[Shape]) -> None:
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
        static.replay[(batch, width)] = _replayer(graph, output, static.model)


def _replayer(graph: Any, output: torch.Tensor, model: Any) -> Any:
    """The replay of one captured shape: its logits, and the layer states the model keeps for an EAGLE-3 head
    (``serve_aux_hidden``), which a replay rewrites in place, handed back to the model as an eager forward would."""
    states = dict(getattr(model, "serve_aux_hidden", None) or {})  # this shape's, as captured

    def replay() -> torch.Tensor:
        graph.replay()
        if states:
            model.serve_aux_hidden = dict(states)
        return output

    return replay


def _replay_error(static: StaticDecode, shape: Shape) -> float:
    """Relative difference between eager and replayed logits on a random probe batch of ``shape``."""
    batch, width = shape
    static.load_probe(batch, width, torch.Generator().manual_seed(batch * 7919 + width))
    eager = static.run(batch, width).float().clone()
    replayed = static.forward(batch, width).float()
    torch.cuda.synchronize()
    return relative_error(replayed, eager)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖ in float32: how every self-check (graphs, piecewise, COMPILE) compares."""
    got, expected = got.float(), expected.float()
    return float((got - expected).norm() / expected.norm().clamp_min(1e-6))
