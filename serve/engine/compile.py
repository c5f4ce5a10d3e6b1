"""COMPILE: ``torch.compile`` of the lean model's per-layer pieces, with inductor's cache on disk and an eager
fallback.

Each decoder layer runs as two halves around the engine's paged attention (``serve.modeling.llama.run_layer``):
before it (input norm, fused q/k/v, q/k norms, RoPE) and after it (o projection, residual, norm, MLP, residual).
Those two functions are compiled once and shared by every layer (the layer's weights are graph inputs, so all
layers reuse one compiled graph). Attention — the KV-cache write and gather — stays eager behind ``attend``.

Shapes: the token dimension varies from step to step (the decode batch, prompt chunks). Dynamo specialises the
first size it sees and, on the next, recompiles once with that dimension symbolic ("automatic dynamic"); a size
of 1 is always specialised. So start-up compiles each half for 1 token and for a dynamic count, and later steps
reuse those graphs instead of recompiling per shape (``warm_up`` runs both before serving).

Inductor's cache (compiled kernels and FX graphs) lives in ``<SERVE_CACHE_DIR>/inductor``, so a second start of
the same model and torch reuses it. Inductor takes its folder from the environment only (torch has no config setting
for it), so start-up compiles inside torch's own ``temporary_cache_dir``; a recompile after start-up, which serving
does not need, would use torch's default folder.

Any compile error or a probe that differs from eager turns COMPILE off with the reason logged; a failure on a later
call falls back to eager for good: never wrong tokens.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from serve.engine.graphs import relative_error

log = logging.getLogger(__name__)

PROBE_TOLERANCE = 1e-3  # relative, float32 logits: inductor reorders reductions, nothing more
# bf16/fp16 logits: inductor rounds a fused op once where eager rounds each op, and the differences add up over the
# layers (SmolLM2 in bf16: compiled vs eager 2-4% of the logits' norm, eager bf16 vs float32 3.6-5.1%)
EPSILONS_OF_LOW_PRECISION = 8
RECOMPILE_LIMIT = 64  # per compiled function: 1 token and the dynamic size, per device (replicas, split models)
_CACHE_DIR_LOCK = threading.Lock()  # inductor's folder is the process's: engines sharing a process compile in turn


@dataclass
class CompileReport:
    """What start-up did about COMPILE (shown in /info next to the CUDA graphs)."""

    enabled: bool = False
    reason: str = "off (COMPILE=false)"
    seconds: float = 0.0  # compiling (or loading from the cache) and the self-check
    cache_dir: Optional[str] = None
    probe_error: Optional[float] = None


def inductor_folder(cache_dir: str) -> str:
    """``<cache_dir>/inductor``, created: the folder of inductor's cache (and Triton's, which lives under it)."""
    folder = os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "inductor")
    os.makedirs(folder, exist_ok=True)
    return folder


@contextlib.contextmanager
def compiling_into(folder: str) -> Iterator[None]:
    """Inductor reads and writes its cache in ``folder`` inside this block (torch's own switch, which also drops
    the paths inductor memoised for another folder)."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with _CACHE_DIR_LOCK, temporary_cache_dir(folder):
        yield


def probe_tolerance(dtype: torch.dtype) -> float:
    """The relative error the compiled logits may show against eager: PROBE_TOLERANCE in float32, a few of the
    dtype's rounding steps in bf16 or fp16 (bf16: 6%, still far below a wrong kernel's, which is of order 1)."""
    if dtype == torch.float32 or not dtype.is_floating_point:
        return PROBE_TOLERANCE
    return max(PROBE_TOLERANCE, EPSILONS_OF_LOW_PRECISION * torch.finfo(dtype).eps)


class Guarded:
    """A compiled function that falls back to ``eager`` for good the first time it raises."""

    def __init__(self, name: str, eager: Callable, compiled: Callable):
        self.name, self.eager, self.compiled = name, eager, compiled
        self.failure: Optional[str] = None

    def __call__(self, *args: Any) -> Any:
        if self.failure is None:
            try:
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001 - any compile or run error: eager from now on
                self.failure = f"{type(exc).__name__}: {str(exc)[:500]}"
                log.warning("COMPILE: %s failed (%s); it runs eagerly from now on", self.name, self.failure)
        return self.eager(*args)


def compile_layers(model: Any, cache_dir: str, warm_up: Optional[Callable[[], torch.Tensor]] = None) -> CompileReport:
    """Compile ``model``'s layer halves (a lean model: ``eager_layer_halves``, served through ``layer_halves``), warm
    them up, self-check against eager.

    ``warm_up`` runs the model's forward over the shapes serving will use and returns logits; it runs once eagerly
    and once compiled, and the two must agree. On any failure the model is left eager and the report says why.
    """
    if not hasattr(model, "eager_layer_halves"):
        return CompileReport(reason="not a lean model (LEAN_MODEL serves this model with transformers' code)")
    if getattr(getattr(model, "serve_lora", None), "layers", None):
        return CompileReport(reason="LoRA adapters are loaded: their per-step rows are not traced")
    eager = model.eager_layer_halves
    started = time.monotonic()
    try:
        folder = inductor_folder(cache_dir)
        import torch._dynamo

        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), RECOMPILE_LIMIT))
        compiled = tuple(Guarded(fn.__name__, fn, torch.compile(fn, dynamic=None)) for fn in eager)
        with compiling_into(folder), torch.inference_mode():
            expected = warm_up() if warm_up is not None else None
            model.layer_halves = compiled
            got = warm_up() if warm_up is not None else None
        failures = [piece.failure for piece in compiled if piece.failure]
        if failures:
            raise RuntimeError(failures[0])
        error = None
        if expected is not None:
            error = relative_error(got, expected)
            if not error <= probe_tolerance(getattr(model, "dtype", torch.float32)):  # also catches NaN
                model.layer_halves = eager
                log.warning("COMPILE off: compiled logits differ from eager by %.3g (relative)", error)
                return CompileReport(reason=f"self-check failed: relative error {error:.3g}", probe_error=error)
    except Exception as exc:  # noqa: BLE001 - any failure means: serve eagerly
        model.layer_halves = eager
        log.warning("COMPILE off: %s: %s; the model runs eagerly", type(exc).__name__, str(exc)[:500])
        return CompileReport(reason=f"compile failed: {type(exc).__name__}: {str(exc)[:500]}")
    seconds = time.monotonic() - started
    log.info("COMPILE: layer halves compiled in %.1f s (cache %s, self-check error %s)", seconds, folder, error)
    return CompileReport(True, "compiled", round(seconds, 2), folder, error)


COMPILE_PROBE_TOKENS = (1, 2, 3)  # 1 is specialised; 2 makes the token count dynamic; 3 proves it is reused


@torch.inference_mode()
def probe_logits(model: Any, cache: Any) -> torch.Tensor:
    """Logits of random decode tokens that each see only their own key and value in the scratch block of ``cache``,
    for 1, 2 and 3 tokens (a fixed seed: the same on every call)."""
    from serve.engine.attention import StepLayout, active_step
    from serve.engine.block_manager import SCRATCH_BLOCK

    size, vocab, device = cache.block_size, model.config.get_text_config().vocab_size, model.device
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    logits = []
    for count in COMPILE_PROBE_TOKENS:
        ids = torch.randint(0, vocab, (count,), generator=generator).to(device)
        positions = torch.arange(count) % size
        mask = (torch.arange(size)[None, :] == positions[:, None])[:, None, None, :].to(device)
        tables = as_tensor([[SCRATCH_BLOCK]] * count)
        layout = StepLayout(as_tensor((SCRATCH_BLOCK * size + positions).tolist()), count, tables, mask, [])
        with active_step(cache, layout):
            output = model(input_ids=ids[None], position_ids=positions.to(device)[None], use_cache=False)
        logits.append(output.logits[0].float().clone())
    return torch.cat(logits)
