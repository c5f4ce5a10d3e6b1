"""The KV cache: allocated once, as a pool of fixed-size blocks per layer.

Each layer has a key and a value tensor of shape [blocks, block_size, kv_heads, head_dim]. A token at position p
of a sequence lives in block ``table[p // block_size]`` at offset ``p % block_size``; its keys and values are
written in place (one ``index_copy_`` per layer over the flattened block x offset axis), so a sequence joining or
leaving never moves another's cache. A sequence takes blocks as it grows (serve/engine/block_manager.py).

KV_CACHE_DTYPE=fp8 stores keys and values as float8 e4m3 (one byte each: half a bfloat16 cache's bytes per token)
with a scale per layer for keys and one for values: a stored value times its scale is the key or value. The scales
start at 1.0 and are set once, on the device (no host read), by the first write that holds prompt tokens (the first
prefill): the largest magnitude seen, times FP8_HEADROOM, maps to the e4m3 maximum; later values beyond that range
are clamped to it. Every read path multiplies by the scale (``dequantize``, the Triton and the CPU decode kernels).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from serve.engine.types import KV_CACHE_DTYPES

log = logging.getLogger(__name__)

CPU_CACHE_FRACTION_OF_RAM = 0.2
CPU_CACHE_MAX_BYTES = 8 * 1024**3
GPU_CACHE_FRACTION_OF_FREE = 0.85  # under tensor parallelism, where no dummy step is profiled (kv_memory.py)
FP8_MAX = 448.0  # the largest float8 e4m3 (fn) value
FP8_HEADROOM = 4.0  # the first prefill's largest magnitude maps to FP8_MAX / FP8_HEADROOM


def storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the cache stores for KV_CACHE_DTYPE (``auto``: the model's); a clear error where torch lacks fp8."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype != "fp8":
        raise ValueError(f"KV_CACHE_DTYPE={kv_cache_dtype!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is None:
        raise ValueError(
            f"KV_CACHE_DTYPE=fp8 needs torch.float8_e4m3fn, which torch {torch.__version__} lacks: "
            "set KV_CACHE_DTYPE=auto or install torch 2.1 or later"
        )
    return fp8


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == getattr(torch, "float8_e4m3fn", None)


def quantize(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``values`` / ``scale``, clamped to the e4m3 range, as float8 e4m3 bytes (``torch.uint8``)."""
    scaled = (values.float() / scale).clamp_(-FP8_MAX, FP8_MAX)
    return scaled.to(torch.float8_e4m3fn).view(torch.uint8)


def dequantize(stored: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Stored keys or values as ``dtype``: times ``scale`` for an fp8 cache (None: stored as they are)."""
    if scale is None:
        return stored.to(dtype)
    return (stored.float() * scale).to(dtype)


@dataclass(frozen=True)
class CacheShape:
    """What one cached token costs: layers x (key + value) x kv_heads x head_dim."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, config: Any, dtype: torch.dtype, kv_heads: Optional[int] = None) -> "CacheShape":
        """The config's shape; ``kv_heads``: the KV heads this process holds (a tensor-parallel rank's share)."""
        config = getattr(config, "text_config", None) or config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = kv_heads or getattr(config, "num_key_value_heads", None) or heads
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
        return min(
            int(torch.cuda.mem_get_info(device)[0] * GPU_CACHE_FRACTION_OF_FREE * len(per_layer) / count)
            for device, count in counts.items()
        )
    import psutil

    return int(min(psutil.virtual_memory().available * CPU_CACHE_FRACTION_OF_RAM, CPU_CACHE_MAX_BYTES))


def plan_blocks(
    shape: CacheShape, block_size: int, max_batch_total_tokens: Optional[int], cache_bytes: int, min_tokens: int
) -> int:
    """Blocks in the pool: the token budget (MAX_BATCH_TOTAL_TOKENS, or what memory allows) over the block size,
    at least room for one sequence of ``min_tokens``; plus the scratch block."""
    budget = max_batch_total_tokens or cache_bytes // shape.bytes_per_token
    return max(budget, min_tokens) // block_size + 1


class PagedKVCache:
    """Preallocated keys and values for ``num_blocks`` blocks of ``block_size`` tokens, per layer.

    Each layer's key and value tensors have shape [num_blocks, block_size, kv_heads, head_dim]. Which block
    belongs to whom is the BlockManager's business; this class only stores and writes.
    """

    def __init__(self, shape: CacheShape, num_blocks: int, block_size: int, devices: Devices):
        """``devices``: one device for all layers, or each layer's device (a model split over GPUs)."""
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        size = (num_blocks, block_size, shape.kv_heads, shape.head_dim)
        per_layer = [devices] * shape.layers if isinstance(devices, torch.device) else list(devices)
        if len(per_layer) != shape.layers:
            raise ValueError(f"{len(per_layer)} layer devices for a model of {shape.layers} layers")
        # zeros, not empty: masked-out positions are still multiplied by 0, and 0 * NaN garbage would be NaN
        self.keys = [torch.zeros(size, dtype=shape.dtype, device=device) for device in per_layer]
        self.values = [torch.zeros(size, dtype=shape.dtype, device=device) for device in per_layer]
        self.quantized = is_fp8(shape.dtype)
        # fp8: per layer, [key scale, value scale] on the layer's device (kernels read them there, graphs replay them)
        self.scales = [torch.ones(2, dtype=torch.float32, device=device) for device in per_layer]
        self._calibrated = [False] * shape.layers
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s)",
            num_blocks,
            block_size,
            self.tokens,
            self.tokens * shape.bytes_per_token / 1024**3,
            shape.dtype,
        )

    @property
    def tokens(self) -> int:
        """Tokens the pool holds, scratch block excluded."""
        return (self.num_blocks - 1) * self.block_size

    def layer_scales(self, layer: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """An fp8 cache's (key scale, value scale) of ``layer``, each a one-element device tensor; None otherwise."""
        if not self.quantized:
            return None
        scales = self.scales[layer]
        return scales[0:1], scales[1:2]

    def write(
        self, layer: int, rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor, calibrate: bool = False
    ) -> None:
        """Store [tokens, kv_heads, head_dim] keys/values at flat rows ``block * block_size + offset``.

        ``rows`` must be on the layer's device (``StepLayout.on``). ``calibrate``: the write holds prompt tokens; the
        first such write sets an fp8 cache's scales of the layer."""
        flat = (self.num_blocks * self.block_size, self.shape.kv_heads, self.shape.head_dim)
        if not self.quantized:
            self.keys[layer].view(flat).index_copy_(0, rows, key.to(self.shape.dtype))
            self.values[layer].view(flat).index_copy_(0, rows, value.to(self.shape.dtype))
            return
        if calibrate and not self._calibrated[layer]:
            self._calibrate(layer, key, value)
        key_scale, value_scale = self.layer_scales(layer)
        self.keys[layer].view(flat).view(torch.uint8).index_copy_(0, rows, quantize(key, key_scale))
        self.values[layer].view(flat).view(torch.uint8).index_copy_(0, rows, quantize(value, value_scale))

    def _calibrate(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Set the layer's scales from these keys and values (on the device, no host read); once per layer."""
        magnitudes = torch.stack([key.detach().abs().amax(), value.detach().abs().amax()]).float()
        self.scales[layer].copy_(magnitudes.clamp_min(1e-6) * (FP8_HEADROOM / FP8_MAX))
        self._calibrated[layer] = True
