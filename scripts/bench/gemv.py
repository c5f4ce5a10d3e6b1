"""How fast can a decode step read its float32 weights on this CPU? Each kernel for a linear layer (torch's, and
our panel kernel, serve/modeling/cpu_kernel.c), run over the embedded SmolLM2's 30 layers of distinct weights
(424 MB, far past the L3 cache) for a step of ROWS rows, against a plain ``sum`` over the same bytes (the host's
read bandwidth). Then the same weights in bfloat16 (212 MB): torch's matmuls, and the panel kernel's bf16 panels
where the CPU has AVX-512 BF16 (GB/s counts the float32 bytes throughout, so the rows compare as speeds).

Run: .venv/bin/python scripts/bench/gemv.py [THREADS] [ROWS]   (prints ms per 30 layers and GB/s per kernel)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from serve.config import load_settings  # noqa: E402
from serve.modeling.cpu_kernel import load_panel_kernel  # noqa: E402

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out): q/k/v fused, o, gate/up fused, down
LAYERS = 30
REPS = 10


def timed(calls: list[Callable[[], object]]) -> float:
    """Seconds for one pass over ``calls`` (best of REPS, after warm-up passes): with one thread the calling
    thread's CPU time, which other busy processes on a shared machine cannot inflate, else the wall clock."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for _ in range(3):
        for call in calls:
            call()
    best = float("inf")
    for _ in range(REPS):
        started = clock()
        for call in calls:
            call()
        best = min(best, clock() - started)
    return best


def bf16_kernels(kernel, weights: list[torch.Tensor], rows: dict, count: int) -> dict:
    """The bf16 rows of the table: dense and oneDNN-packed matmuls, and the panel kernel where it takes bf16."""
    weights = [weight.bfloat16() for weight in weights]
    rows = {size: x.bfloat16() for size, x in rows.items()}
    packed = [(torch.ops.mkldnn._reorder_linear_weight(weight, count), weight.shape[1]) for weight in weights]
    kernels = {
        "bf16: F.linear, dense (oneDNN)": [lambda w=w: F.linear(rows[w.shape[1]], w) for w in weights],
        "bf16: oneDNN packed (_linear_pointwise)": [
            lambda p=p, i=i: torch.ops.mkldnn._linear_pointwise(rows[i], p, None, "none", [None], "") for p, i in packed
        ],
    }
    if kernel.bf16_missing:
        print(f"no bf16 panel kernel: {kernel.bf16_missing}")
        return kernels
    panels = [(kernel.pack(weight), weight.shape) for weight in weights]
    kernels["bf16: panel kernel (AVX-512 BF16)"] = [
        lambda p=p, s=s: kernel.linear(rows[s[1]], p, None, s[0]) for p, s in panels
    ]
    return kernels


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    weights = [torch.randn(out, inp) for _ in range(LAYERS) for inp, out in SHAPES]
    total = sum(weight.numel() * 4 for weight in weights)
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    rows = {inp: torch.randn(count, inp) for inp, _ in SHAPES}
    packed = [(torch.ops.mkldnn._reorder_linear_weight(weight, count), weight.shape[1]) for weight in weights]
    mkl = [(torch.ops.mkl._mkl_reorder_linear_weight(weight, 1), weight) for weight in weights]
    transposed = [weight.t().contiguous() for weight in weights]
    kernels = {
        "sum over the same bytes (read bandwidth)": [lambda w=w: w.sum() for w in weights],
        "F.linear, dense (MKL)": [lambda w=w: torch.nn.functional.linear(rows[w.shape[1]], w) for w in weights],
        "oneDNN packed (_linear_pointwise, CPU_KERNEL=onednn)": [
            lambda p=p, i=i: torch.ops.mkldnn._linear_pointwise(rows[i], p, None, "none", [None], "") for p, i in packed
        ],
        "MKL packed (_mkl_linear)": [
            lambda p=p, w=w: torch.ops.mkl._mkl_linear(rows[w.shape[1]], p, w, None, 1) for p, w in mkl
        ],
        "x @ W^T stored transposed": [lambda w=w: rows[w.shape[0]] @ w for w in transposed],
    }
    settings = load_settings()
    kernel, why_not = load_panel_kernel(settings.cache_dir, settings.c_compiler)
    if kernel is not None:
        panels = [(kernel.pack(weight), weight.shape) for weight in weights]
        kernels["panel kernel (what PACK_CPU_WEIGHTS uses)"] = [
            lambda p=p, s=s: kernel.linear(rows[s[1]], p, None, s[0]) for p, s in panels
        ]
        kernels.update(bf16_kernels(kernel, weights, rows, count))
    else:
        print(f"no panel kernel: {why_not}")
    threads = torch.get_num_threads()
    print(f"{LAYERS} layers, {total / 1e6:.0f} MB of float32 weights, {threads} thread(s), {count} row(s)")
    print("| kernel | ms per step's linears | GB/s |\n| --- | ---: | ---: |")
    for name, calls in kernels.items():
        seconds = timed(calls)
        print(f"| {name} | {seconds * 1e3:.2f} | {total / seconds / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
