"""Steps that hold prompt chunks, replayed piecewise from CUDA graphs (vLLM's piecewise capture, by hand).

A step with prompt chunks has a layout that changes every time (which chunks, where their prefixes lie), so it
cannot be one graph. The lean model's layers are two halves around the engine's attention
(``serve.modeling.llama.run_layer``): the work before attention (norm, fused q/k/v, RoPE) and after it (o
projection, residual, norm, MLP). Both are row-wise: each token's output depends on its own row alone. So each half
of each layer is captured once per token-count bucket over static buffers; a step pads its token count to the
bucket, replays the halves, and runs attention eagerly between them on its real rows. The padded rows hold stale
values that never meet a real row.

``PiecewiseHalves.install`` puts the replaying halves in the model's ``layer_halves``. A step whose token count has
no bucket, or that uses a LoRA adapter (captured without adapter rows), runs the halves eagerly. Every captured
half is self-checked against its eager run on random rows; a bucket whose check fails runs eagerly. ``capture``
turns a function over the static buffers into its replay: a CUDA graph on a GPU; the tests pass the function itself
(replay = run it again), so the CPU proves the buffers, the padding and the bucket choice the GPU replays.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from serve.engine.graphs import relative_error

log = logging.getLogger(__name__)

TOKEN_BUCKETS = (16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
PROBE_TOLERANCE = 1e-2  # relative: a replay runs the same kernels on the same rows as eager
WARMUP_RUNS = 2

Capture = Callable[[Callable[[], None]], Callable[[], None]]  # a function over the buffers -> its replay


@dataclass
class PiecewiseReport:
    """What start-up did about steps with prompt chunks (shown in /info beside the decode graphs)."""

    enabled: bool = False
    reason: str = "not captured"
    buckets: list[int] = field(default_factory=list)  # token counts whose halves replay
    capture_seconds: float = 0.0
    probe_error: Optional[float] = None  # the largest relative error among the halves kept
    dropped: list[str] = field(default_factory=list)  # "<bucket>: why" for each bucket that runs eagerly


def token_buckets(max_tokens: int) -> list[int]:
    """The token counts a step with prompt chunks is padded to, up to (and including) ``max_tokens``."""
    return [size for size in TOKEN_BUCKETS if size < max_tokens] + [max_tokens]


class Buffers:
    """The static rows the captured halves read and write, sized for the largest bucket."""

    def __init__(self, rows: int, hidden: torch.Tensor, rope: torch.Tensor, qkv: tuple, attended: torch.Tensor):
        empty = lambda like: torch.zeros((rows, *like.shape[1:]), dtype=like.dtype, device=like.device)  # noqa: E731
        self.hidden, self.cos, self.sin = empty(hidden), empty(rope), empty(rope)
        self.q, self.k, self.v = (empty(part) for part in qkv)
        self.attended = empty(attended)


class PiecewiseHalves:
    """The lean model's layer halves replayed per (layer, token bucket) from captures over ``Buffers``."""

    def __init__(self, model: Any, max_tokens: int, capture: Capture):
        self.model, self.capture = model, capture
        self.inner = model.layer_halves  # eager, or COMPILE's compiled halves
        self.buckets = token_buckets(max_tokens)
        self.replays: dict[tuple[int, int, int], Callable[[], None]] = {}  # (layer, bucket, half) -> replay
        self.kept: list[int] = []  # buckets whose halves replay
        self.active = True  # the runner turns it off for a step that uses an adapter
        self.buffers: Optional[Buffers] = None
        self._rope: Optional[torch.Tensor] = None  # the step's cos already in the buffers (one copy per step)
        self._probe_rows: Optional[tuple] = None  # the self-check's random inputs (``_probe``)

    def capture_all(self) -> PiecewiseReport:
        """Capture every layer's halves for every bucket, largest first, and self-check each; install them."""
        started = time.monotonic()
        layers = list(self.model.model.layers)
        self.buffers = self._make_buffers(layers[0], self.buckets[-1])
        dropped, worst = [], 0.0
        for bucket in sorted(self.buckets, reverse=True):
            for layer in layers:
                self._capture_layer(layer, bucket)
            error = max(self._check(layer, bucket) for layer in layers)
            if error <= PROBE_TOLERANCE:
                self.kept.append(bucket)
                worst = max(worst, error)
            else:
                for layer in layers:  # its graphs go: nothing replays them
                    for half in (0, 1):
                        self.replays.pop((layer.self_attn.layer_idx, bucket, half))
                dropped.append(f"{bucket}: replay differs from eager by {error:.3g} (relative)")
                log.warning("piecewise graphs of %d tokens dropped (error %.3g); such steps run eagerly", bucket, error)
        self.kept.sort()
        self._probe_rows = None
        self.install()
        seconds = round(time.monotonic() - started, 2)
        enabled = bool(self.kept)
        reason = "captured" if enabled else "self-check failed: " + "; ".join(dropped)
        return PiecewiseReport(enabled, reason, list(self.kept), seconds, worst if enabled else None, dropped)

    def install(self) -> None:
        self.model.layer_halves = (self.before, self.after)

    def uninstall(self) -> None:
        self.model.layer_halves = self.inner
        self.replays.clear()
        self.kept = []

    def _make_buffers(self, layer: Any, rows: int) -> Buffers:
        """Buffers shaped by one eager run of the first layer's halves on one row."""
        hidden = torch.zeros(1, self.model.config.hidden_size, dtype=self.model.dtype, device=self.model.device)
        cos, sin = self.model.model.rotary(torch.zeros(1, dtype=torch.long, device=hidden.device), hidden.dtype)
        before, after = self.inner
        qkv = tuple(part.clone() for part in before(layer, hidden, cos, sin))
        return Buffers(rows, hidden, cos, qkv, torch.zeros_like(qkv[0]))

    def _capture_layer(self, layer: Any, bucket: int) -> None:
        buffers, (before, after), index = self.buffers, self.inner, layer.self_attn.layer_idx

        def run_before() -> None:
            q, k, v = before(layer, buffers.hidden[:bucket], buffers.cos[:bucket], buffers.sin[:bucket])
            buffers.q[:bucket].copy_(q)
            buffers.k[:bucket].copy_(k)
            buffers.v[:bucket].copy_(v)

        def run_after() -> None:
            buffers.hidden[:bucket].copy_(after(layer, buffers.hidden[:bucket], buffers.attended[:bucket]))

        self.replays[(index, bucket, 0)] = self.capture(run_before)
        self.replays[(index, bucket, 1)] = self.capture(run_after)

    def _check(self, layer: Any, bucket: int) -> float:
        """The largest relative difference between the replayed halves and eager ones on random rows."""
        buffers, (before, after), index = self.buffers, self.inner, layer.self_attn.layer_idx
        rows, attended, cos, sin = (part[:bucket] for part in self._probe())
        expected = [part.clone() for part in before(layer, rows.clone(), cos, sin)]
        expected.append(after(layer, rows.clone(), attended).clone())
        buffers.hidden[:bucket].copy_(rows)
        buffers.cos[:bucket].copy_(cos)
        buffers.sin[:bucket].copy_(sin)
        self.replays[(index, bucket, 0)]()
        got = [buffers.q[:bucket].clone(), buffers.k[:bucket].clone(), buffers.v[:bucket].clone()]
        buffers.hidden[:bucket].copy_(rows)
        buffers.attended[:bucket].copy_(attended)
        self.replays[(index, bucket, 1)]()
        got.append(buffers.hidden[:bucket].clone())
        self._rope = None
        return max(relative_error(a, b) for a, b in zip(got, expected))

    def _probe(self) -> tuple[torch.Tensor, ...]:
        """Random rows, attention outputs and rotary tables for the largest bucket, made once on the device."""
        if self._probe_rows is None:
            buffers = self.buffers
            generator = torch.Generator(device=buffers.hidden.device).manual_seed(0)
            random = lambda like: torch.randn(like.shape, generator=generator, device=like.device).to(like.dtype)  # noqa: E731
            positions = torch.randint(
                0, 4096, (buffers.hidden.shape[0],), generator=generator, device=buffers.hidden.device
            )
            self._probe_rows = (
                random(buffers.hidden),
                random(buffers.attended),
                *self.model.model.rotary(positions, buffers.hidden.dtype),
            )
        return self._probe_rows

    def bucket(self, tokens: int) -> Optional[int]:
        """The bucket a step of ``tokens`` replays at (None: it runs eagerly)."""
        if not self.active or not self.kept or tokens > self.kept[-1]:
            return None
        return self.kept[bisect.bisect_left(self.kept, tokens)]

    def before(
        self, layer: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's work before attention on the step's rows, replayed at their bucket (eager without one)."""
        tokens = hidden.shape[0]
        bucket = self.bucket(tokens)
        if bucket is None:
            return self.inner[0](layer, hidden, cos, sin)
        buffers = self.buffers
        if hidden.data_ptr() != buffers.hidden.data_ptr():  # the first layer: the embeddings
            buffers.hidden[:tokens].copy_(hidden)
        if cos is not self._rope:
            buffers.cos[:tokens].copy_(cos)
            buffers.sin[:tokens].copy_(sin)
            self._rope = cos
        self.replays[(layer.self_attn.layer_idx, bucket, 0)]()
        return buffers.q[:tokens], buffers.k[:tokens], buffers.v[:tokens]

    def after(self, layer: Any, hidden: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The layer's work after attention, replayed at the bucket; its output is the buffer's rows (the next
        layer's input, where the next ``before`` finds it)."""
        tokens = hidden.shape[0]
        bucket = self.bucket(tokens)
        if bucket is None:
            return self.inner[1](layer, hidden, attended)
        buffers = self.buffers
        if hidden.data_ptr() != buffers.hidden.data_ptr():
            buffers.hidden[:tokens].copy_(hidden)
        buffers.attended[:tokens].copy_(attended.view(buffers.attended[:tokens].shape))
        self.replays[(layer.self_attn.layer_idx, bucket, 1)]()
        return buffers.hidden[:tokens]


def cuda_capture() -> Capture:
    """Capture on the current CUDA device, every graph into one memory pool (the halves run one after another)."""
    pool: list[Any] = [None]

    def capture(run: Callable[[], None]) -> Callable[[], None]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool[0]):
            run()
        pool[0] = graph.pool()
        return graph.replay

    return capture


def capture_piecewise(
    model: Any, max_tokens: int, capture: Optional[Capture] = None, tensor_parallel: bool = False
) -> PiecewiseReport:
    """Capture the lean model's halves for steps of up to ``max_tokens`` (``capture``: CUDA graphs by default), or
    say why not; a failure leaves the halves eager."""
    if tensor_parallel:
        return PiecewiseReport(reason="off: tensor parallelism (every rank would have to keep the same buckets)")
    if max_tokens <= 0:
        return PiecewiseReport(reason="off: no step size given")
    if not hasattr(model, "layer_halves"):
        return PiecewiseReport(reason="off: not the lean model (transformers' layers have no halves to capture)")
    if getattr(model, "serve_aux_layers", None):
        return PiecewiseReport(reason="off: the EAGLE-3 head keeps layer states, which the buffers would overwrite")
    if capture is None and model.device.type != "cuda":
        return PiecewiseReport(reason=f"no CUDA device ({model.device.type}): steps with prompt chunks run eagerly")
    halves = PiecewiseHalves(model, max_tokens, capture or cuda_capture())
    try:
        with torch.inference_mode():
            report = halves.capture_all()
    except Exception as exc:  # noqa: BLE001 - any capture failure means: run such steps eagerly
        halves.uninstall()
        log.warning("piecewise graphs off: capture failed (%s: %s)", type(exc).__name__, exc)
        return PiecewiseReport(reason=f"capture failed: {type(exc).__name__}: {exc}")
    model.serve_piecewise = halves
    log.info("piecewise graphs: %s, buckets %s, %.1f s", report.reason, report.buckets, report.capture_seconds)
    return report
