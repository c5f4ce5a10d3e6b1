"""On the CPU: the lean model's weights handed to a CPU kernel in its own layout (the panel kernel or oneDNN)."""

from __future__ import annotations

import logging
from typing import Any

from serve.config import Settings

log = logging.getLogger(__name__)


def pack_cpu_weights(model: Any, settings: Settings) -> str:
    """Hand the lean model's float32 weights to a CPU kernel in its own layout (PACK_CPU_WEIGHTS, on by default):
    the panel kernel (CPU_KERNEL=panels, where it builds) or oneDNN. Each layer is checked against the dense
    matmul first. Returns what /info shows."""
    import torch

    from serve.modeling.cpu_kernel import load_panel_kernel
    from serve.modeling.layers import pack_for_cpu, use_layer_ops

    if not settings.pack_cpu_weights:
        layout = "dense: PACK_CPU_WEIGHTS=false"
    elif settings.cpu_kernel == "onednn":
        layout = pack_for_cpu(model) + " (CPU_KERNEL=onednn)"
    else:
        kernel, why_not = load_panel_kernel(settings.cache_dir, settings.c_compiler)
        layout = pack_for_cpu(model, kernel) + (f" (no panel kernel: {why_not})" if kernel is None else "")
        if kernel is not None and model.dtype == torch.float32 and use_layer_ops(model, kernel.layer_ops):
            layout += "; RMSNorm, SiLU gate and rotary in one pass each"
    log.info("CPU weights: %s", layout)
    return layout
