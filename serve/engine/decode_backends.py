"""Which kernel runs decode attention over the paged cache (ATTENTION_BACKEND), and why: /info shows the choice.

- ``triton``: serve.engine.paged_triton on CUDA; reads K/V in place, splits long contexts, capturable.
- ``cpu``: serve.engine.paged_cpu (C, OpenMP) for float32, bfloat16 and fp8 (KV_CACHE_DTYPE=fp8) caches on x86-64
  with AVX2 (an fp8 cache under a float16 model is read by the reference).
- ``sdpa``: the reference: gather each sequence's blocks into a copy, then SDPA with a length mask.
- ``flashinfer``: not available in this build (see FLASHINFER_UNAVAILABLE).
- ``auto``: triton on CUDA, cpu on the CPU, each where it can run; sdpa otherwise.

A named backend that cannot run here falls back to what ``auto`` picks, with both reasons in the report.

Prompt chunks (prefill) take the in-place Triton kernel (serve.engine.paged_triton_prefill) on CUDA unless ``sdpa``
is asked for (``triton`` also takes it on the CPU under Triton's interpreter, for the tests); elsewhere the
reference gathers a later chunk's prefix. The report says which and why.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from serve.engine.attention import DecodeKernel, PrefillKernel, Scales, StepLayout, use_decode_kernel
from serve.engine.attention import _decode_attention, use_prefill_kernel
from serve.engine.kv_cache import CacheShape, PagedKVCache, is_fp8
from serve.engine.types import ATTENTION_BACKENDS

log = logging.getLogger(__name__)

FLASHINFER_UNAVAILABLE = (
    "FlashInfer is not available in this build: its paged decode is not wired in, because FlashInfer could not be "
    "installed and tested where this server is built"
)
KERNEL_FOLDER = Path(tempfile.gettempdir()) / "sagemaker-llm-serve"  # <folder>/kernels: built libraries
ROWS_UP_TO = 192  # the CPU kernel takes prompt chunks that end within this many positions (docs/settings.md)


@dataclass(frozen=True)
class AttentionReport:
    """The decode attention backend in use, what was asked for, and why; the same for prompt chunks (in /info)."""

    backend: str
    requested: str
    reason: str
    prefill: str = "sdpa"
    prefill_reason: str = ""


Candidate = tuple[Optional[DecodeKernel], str]  # (the kernel, "") or (None, why it cannot run here)


def install_decode_backend(cache: PagedKVCache, requested: str, c_compiler: Optional[str] = None) -> AttentionReport:
    """Pick the decode attention of ``cache``'s steps for ``requested`` (one of ATTENTION_BACKENDS) and install it."""
    name, kernel, reason = _choose(requested, cache.keys[0].device, cache.shape, c_compiler)
    use_decode_kernel(cache, kernel)
    log.info("Decode attention: %s (%s)", name, reason)
    prefill, prefill_kernel, prefill_reason = _choose_prefill(
        requested, cache.keys[0].device, cache.shape.dtype, name, c_compiler
    )
    use_prefill_kernel(cache, prefill_kernel)
    log.info("Prefill attention: %s (%s)", prefill, prefill_reason)
    return AttentionReport(name, requested, reason, prefill, prefill_reason)


def _choose_prefill(
    requested: str, device: torch.device, dtype: torch.dtype, decode: str = "", c_compiler: Optional[str] = None
) -> tuple[str, Optional[PrefillKernel], str]:
    """(backend, kernel (None: the reference), reason) of prompt chunks' attention; ``decode``: the decode backend
    chosen (the CPU kernel also takes short chunks)."""
    from serve.engine.paged_triton_prefill import prefill_attention, prefill_unusable

    if requested == "sdpa":
        return "sdpa", None, "ATTENTION_BACKEND=sdpa: a later chunk's prefix gathered into a copy, dense causal mask"
    if decode == "cpu" and requested in ("auto", "cpu") and not is_fp8(dtype):
        from serve.engine.paged_cpu import load_paged_kernel

        kernel, _ = load_paged_kernel(str(KERNEL_FOLDER), c_compiler)  # loaded already for decode
        reason = (
            f"the in-place CPU kernel for chunks that end within {ROWS_UP_TO} positions (each token a row over its "
            "sequence's blocks, every such chunk of a step in one call); longer ones gathered, SDPA"
        )
        return "cpu", cpu_prefill(kernel.decode), reason
    if requested != "triton" and device.type != "cuda":
        return "sdpa", None, f"no in-place prefill kernel for {device.type} devices: a later chunk's prefix gathered"
    why_not = prefill_unusable(device, dtype)
    if why_not:
        return "sdpa", None, f"the Triton prefill kernel cannot run here ({why_not}): a later chunk's prefix gathered"
    return "triton", prefill_attention, "the in-place Triton kernel, every chunk of a step in one launch"


def _choose(
    requested: str, device: torch.device, shape: CacheShape, c_compiler: Optional[str]
) -> tuple[str, Optional[DecodeKernel], str]:
    """(backend, kernel (None: the reference), reason)."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if requested == "sdpa":
        return "sdpa", None, "ATTENTION_BACKEND=sdpa: blocks gathered into a copy, then SDPA with a length mask"
    if requested != "auto":
        kernel, why_not = _candidate(requested, device, shape, c_compiler)
        if kernel is not None:
            return requested, kernel, f"ATTENTION_BACKEND={requested}"
        name, kernel, reason = _choose("auto", device, shape, c_compiler)
        log.warning("ATTENTION_BACKEND=%s cannot run here (%s); using %s", requested, why_not, name)
        return name, kernel, f"ATTENTION_BACKEND={requested} cannot run here ({why_not}); auto: {reason}"
    preferred = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else None
    if preferred is None:
        return "sdpa", None, f"auto: no in-place kernel for {device.type} devices"
    kernel, why_not = _candidate(preferred, device, shape, c_compiler)
    if kernel is None:
        return "sdpa", None, f"auto: {preferred} cannot run here ({why_not})"
    return preferred, kernel, f"auto: the in-place {preferred} kernel on {device.type}"


def _candidate(name: str, device: torch.device, shape: CacheShape, c_compiler: Optional[str]) -> Candidate:
    if name == "flashinfer":
        return None, FLASHINFER_UNAVAILABLE
    if name == "triton":
        return _triton(device)
    return _cpu(device, shape, c_compiler)


def _triton(device: torch.device) -> Candidate:
    from serve.engine.paged_triton import paged_decode, triton_unusable

    why_not = triton_unusable(device)
    return (None, why_not) if why_not else (_adapt(paged_decode, on_device=True), "")


def _cpu(device: torch.device, shape: CacheShape, c_compiler: Optional[str]) -> Candidate:
    from serve.engine.paged_cpu import DTYPES, load_paged_kernel

    if device.type != "cpu":
        return None, f"the model is on {device.type}, not the CPU"
    if shape.dtype not in DTYPES and not is_fp8(shape.dtype):
        return None, f"the CPU kernel takes float32 or bfloat16 caches, not {str(shape.dtype).replace('torch.', '')}"
    if shape.head_dim % 8:
        return None, f"the CPU kernel takes head dims that are multiples of 8, not {shape.head_dim}"
    kernel, why_not = load_paged_kernel(str(KERNEL_FOLDER), c_compiler)
    if kernel is None:
        return None, why_not
    adapted = _adapt(kernel.decode)
    return (_for_queries(adapted, DTYPES) if is_fp8(shape.dtype) else adapted), ""


def cpu_prefill(decode: Callable[..., torch.Tensor]) -> PrefillKernel:
    """Prompt chunks on the CPU: those ending within ROWS_UP_TO positions all in one call of the decode kernel, each
    token a row that attends over its sequence's blocks up to its own position (its keys and values are written
    before attention runs); the longer ones are left to the reference, whose flash kernel reads each K/V row once for
    many queries where a row each re-reads its whole prefix."""

    def prefill_attention(
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        layout: StepLayout,
        scaling: Optional[float],
        scales: Scales,
        out: torch.Tensor,
    ) -> list[int]:
        short, left = [], []
        for number, chunk in enumerate(layout.prefills):
            (short if chunk.position + chunk.end - chunk.start <= ROWS_UP_TO else left).append(number)
        if short:
            rows = layout.chunk_rows(tuple(short))
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            extra = {} if scales is None else {"kv_scales": scales}
            if rows.span is not None:
                first, end = rows.span
                out[first:end] = decode(query[first:end], keys, values, rows.tables, rows.lengths, scale, **extra)
            else:
                queries = query.index_select(0, rows.index)
                attended = decode(queries, keys, values, rows.tables, rows.lengths, scale, **extra)
                out.index_copy_(0, rows.index, attended)
        return left

    return prefill_attention


def _for_queries(kernel: DecodeKernel, dtypes: tuple[torch.dtype, ...]) -> DecodeKernel:
    """``kernel`` for queries of ``dtypes``, the reference for others (an fp8 cache holds no hint of the model's
    dtype: a float16 model's queries go to the reference)."""

    def decode_attention(
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        layout: StepLayout,
        scaling: Optional[float],
        scales: Scales = None,
    ) -> torch.Tensor:
        chosen = kernel if query.dtype in dtypes else _decode_attention
        return chosen(query, keys, values, layout, scaling, scales)

    return decode_attention


def _adapt(decode: Callable[..., torch.Tensor], on_device: bool = False) -> DecodeKernel:
    """A kernel taking (query, keys, values, tables, lengths, scale[, kv_scales]) as attention's decode step:
    [decode, heads, dim] from the step's first ``decode_count`` queries; an fp8 cache's scales go to it as
    ``kv_scales``. ``on_device``: launched with the tensors' GPU current."""

    def decode_attention(
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        layout: StepLayout,
        scaling: Optional[float],
        scales: Scales = None,
    ) -> torch.Tensor:
        queries = query[: layout.decode_count]
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        extra = {} if scales is None else {"kv_scales": scales}
        current = torch.cuda.device(query.device) if on_device and query.is_cuda else contextlib.nullcontext()
        with current:
            return decode(queries, keys, values, layout.decode_blocks, layout.decode_lengths(), scale, **extra)

    return decode_attention
