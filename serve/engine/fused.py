"""How fused projections are addressed: a fused layer (q/k/v in one matrix, gate/up in another) lists its parts.

A model's fused layer has ``parts``: projection name -> the slice of its output rows that projection owns. LoRA
deltas (serve.engine.lora) and checkpoint weights (serve.modeling.weights) both find a projection's rows here.
"""

from __future__ import annotations

from typing import Optional

from torch import nn


def find_part(parent: nn.Module, child: str) -> Optional[tuple[str, nn.Module, slice]]:
    """(attribute, fused layer, output slice) of the fused layer of ``parent`` that holds projection ``child``."""
    for attribute, module in parent.named_children():
        base = getattr(module, "base", module)  # a layer wrapped by serve.engine.lora keeps its base
        parts = getattr(base, "parts", None)
        if parts and child in parts:
            return attribute, base, parts[child]
    return None
