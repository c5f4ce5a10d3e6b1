"""The KV cache: allocated once, one fixed-length slot per running sequence.

Each layer has a key and a value tensor of shape [slots, max_total_tokens, kv_heads, head_dim]. A sequence owns
one slot from admission to finish; its keys and values are written in place at their positions (one
``index_copy_`` per layer over the flattened slot x position axis), so a sequence joining or leaving never moves
another's cache. The lowest free slot is handed out first, which keeps the used
slots packed at the front: decode attention reads ``[:span]`` as a view, without gathering.
"""

from __future__ import annotations

import collections
import heapq
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

log = logging.getLogger(__name__)

CPU_CACHE_FRACTION_OF_RAM = 0.2
CPU_CACHE_MAX_BYTES = 8 * 1024**3
GPU_CACHE_FRACTION_OF_FREE = 0.85


@dataclass(frozen=True)
class CacheShape:
    """What one cached token costs: layers x (key + value) x kv_heads x head_dim."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, config: Any, dtype: torch.dtype) -> "CacheShape":
        config = getattr(config, "text_config", None) or config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8


Devices = Union[torch.device, Sequence[torch.device]]


def layer_devices(model: Any, layers: int) -> list[torch.device]:
    """The device of each of ``layers`` attention layers, by ``layer_idx`` (several when accelerate split the model
    over GPUs); the model's device for all when its modules do not say."""
    found: dict[int, torch.device] = {}
    for module in model.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and index not in found:
            parameter = next(module.parameters(), None)
            if parameter is not None:
                found[index] = parameter.device
    if sorted(found) != list(range(layers)):
        return [model.device] * layers
    return [found[index] for index in range(layers)]


def default_cache_bytes(devices: Devices) -> int:
    """How much memory the whole cache may take when MAX_BATCH_TOTAL_TOKENS is not set.

    With layers on several GPUs, each GPU holds the cache of its own layers: the GPU with the least free memory
    per layer it holds sets the budget.
    """
    per_layer = [devices] if isinstance(devices, torch.device) else list(devices)
    if per_layer[0].type == "cuda":
        counts = collections.Counter(per_layer)
        return min(int(torch.cuda.mem_get_info(device)[0] * GPU_CACHE_FRACTION_OF_FREE * len(per_layer) / count) for device, count in counts.items())
    import psutil

    return int(min(psutil.virtual_memory().available * CPU_CACHE_FRACTION_OF_RAM, CPU_CACHE_MAX_BYTES))


def plan_slots(shape: CacheShape, slot_tokens: int, max_batch_total_tokens: Optional[int], max_slots: int, cache_bytes: int) -> int:
    """Number of slots: the token budget (MAX_BATCH_TOTAL_TOKENS, or what memory allows) over the slot length."""
    budget = max_batch_total_tokens or cache_bytes // shape.bytes_per_token
    return max(1, min(max_slots, budget // slot_tokens))


class SlotKVCache:
    """Preallocated keys and values for ``slots`` sequences of up to ``slot_tokens`` tokens each."""

    def __init__(self, shape: CacheShape, slots: int, slot_tokens: int, devices: Devices):
        """``devices``: one device for all layers, or each layer's device (a model split over GPUs)."""
        self.shape = shape
        self.slots = slots
        self.slot_tokens = slot_tokens
        size = (slots, slot_tokens, shape.kv_heads, shape.head_dim)
        per_layer = [devices] * shape.layers if isinstance(devices, torch.device) else list(devices)
        if len(per_layer) != shape.layers:
            raise ValueError(f"{len(per_layer)} layer devices for a model of {shape.layers} layers")
        # zeros, not empty: masked-out positions are still multiplied by 0, and 0 * NaN garbage would be NaN
        self.keys = [torch.zeros(size, dtype=shape.dtype, device=device) for device in per_layer]
        self.values = [torch.zeros(size, dtype=shape.dtype, device=device) for device in per_layer]
        self._free = list(range(slots))
        heapq.heapify(self._free)
        log.info(
            "KV cache: %d slots x %d tokens (%.2f GiB, %s)",
            slots, slot_tokens, slots * slot_tokens * shape.bytes_per_token / 1024**3, shape.dtype,
        )

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def write(self, layer: int, rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store [tokens, kv_heads, head_dim] keys/values at flat rows ``slot * slot_tokens + position``.

        ``rows`` must be on the layer's device (``StepLayout.on``)."""
        flat = (self.slots * self.slot_tokens, self.shape.kv_heads, self.shape.head_dim)
        self.keys[layer].view(flat).index_copy_(0, rows, key.to(self.shape.dtype))
        self.values[layer].view(flat).index_copy_(0, rows, value.to(self.shape.dtype))

    def allocate(self) -> int:
        """The lowest free slot (raises IndexError when none is free)."""
        return heapq.heappop(self._free)

    def release(self, slot: int) -> None:
        heapq.heappush(self._free, slot)
