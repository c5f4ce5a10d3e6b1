"""Where the model goes over SM_NUM_GPUS: one copy per GPU (replicas) or one copy split over them (shard).

A pure function of the model's footprint (estimated from its config), the GPU inventory and the KV-cache room
one engine needs, so it is tested on simulated inventories; the loader feeds it the real ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

GIB = 1024**3
WEIGHT_AND_CACHE_FRACTION = 0.9  # of a GPU's free memory; the rest is for activations and the CUDA context
MIN_CACHE_SLOTS = 4  # an engine must hold the weights plus the KV cache of this many full-length sequences


class PlacementError(ValueError):
    """The model cannot be placed as asked (too big, too few GPUs); the message says what to change."""


@dataclass(frozen=True)
class Footprint:
    """What one copy of the model costs: its weights, and the KV cache per token."""

    weight_bytes: int
    cache_bytes_per_token: int

    def need(self, cache_tokens: int) -> int:
        return self.weight_bytes + self.cache_bytes_per_token * cache_tokens


def parameter_count(config: Any) -> int:
    """Parameters of a decoder-only transformer from its config (attention, gated MLP or experts, embeddings)."""
    config = getattr(config, "text_config", None) or config
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 1
    intermediate = getattr(config, "moe_intermediate_size", None) if experts > 1 else None
    mlp = 3 * hidden * (intermediate or config.intermediate_size) * experts
    embeddings = vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return layers * (attention + mlp + 2 * hidden) + embeddings + hidden


def footprint(config: Any, bytes_per_parameter: float, cache_dtype_bytes: int) -> Footprint:
    """The model's weights at ``bytes_per_parameter`` (2 for bf16, 0.5 for 4-bit) and its KV bytes per token."""
    text = getattr(config, "text_config", None) or config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    per_token = text.num_hidden_layers * 2 * kv_heads * head_dim * cache_dtype_bytes
    return Footprint(int(parameter_count(config) * bytes_per_parameter), per_token)


@dataclass(frozen=True)
class EnginePlacement:
    """Where one engine's copy of the model lives, as ``from_pretrained`` placement arguments."""

    devices: tuple[str, ...]
    device_map: Any = None
    max_memory: Optional[dict[int, int]] = None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.device_map is not None:
            kwargs["device_map"] = self.device_map
        if self.max_memory is not None:
            kwargs["max_memory"] = self.max_memory
        return kwargs


@dataclass(frozen=True)
class PlacementPlan:
    """``mode`` is replicas (one engine per entry of ``engines``) or shard (one engine over several GPUs)."""

    mode: str
    engines: tuple[EnginePlacement, ...]
    reason: str
    devices: tuple[str, ...] = field(default=())

    def describe(self) -> dict[str, Any]:
        """What /info reports."""
        return {
            "mode": self.mode,
            "reason": self.reason,
            "devices": list(self.devices),
            "engines": [list(engine.devices) for engine in self.engines],
        }


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


def plan_placement(
    mode: str,
    num_gpus: Optional[int],
    free_bytes_per_gpu: list[int],
    model: Footprint,
    cache_tokens: int,
    replicas: Optional[int] = None,
) -> PlacementPlan:
    """Decide replicas vs shard (``mode`` auto), or check the one asked for; raise PlacementError if it cannot fit.

    ``cache_tokens`` is the KV-cache room one engine needs (MAX_BATCH_TOTAL_TOKENS, else a few full-length slots).
    """
    visible = len(free_bytes_per_gpu)
    gpus = visible if num_gpus is None else num_gpus
    if gpus > visible:
        raise PlacementError(f"SM_NUM_GPUS={gpus} but only {visible} GPU(s) are visible")
    if gpus == 0:
        return _cpu_plan(mode, replicas)
    usable = [int(free * WEIGHT_AND_CACHE_FRACTION) for free in free_bytes_per_gpu[:gpus]]
    need = model.need(cache_tokens)
    fits_one = need <= min(usable)
    kv_bytes = _gib(need - model.weight_bytes)
    sizes = f"{_gib(model.weight_bytes)} of weights + {kv_bytes} of KV cache for {cache_tokens} tokens"
    if mode == "replicas" or (mode == "auto" and fits_one):
        if not fits_one:
            raise PlacementError(
                f"PLACEMENT=replicas: one copy needs {sizes}, more than one GPU's usable {_gib(min(usable))}; "
                "use PLACEMENT=shard (or auto), HF_MODEL_QUANTIZE, or a lower MAX_BATCH_TOTAL_TOKENS"
            )
        return _replica_plan(gpus, replicas, f"one copy ({sizes}) fits one GPU ({_gib(min(usable))} usable)")
    if need > sum(usable):
        raise PlacementError(
            f"the model needs {sizes}, more than the {_gib(sum(usable))} usable on {gpus} GPU(s); "
            "use more or larger GPUs, HF_MODEL_QUANTIZE, or a lower MAX_TOTAL_TOKENS/MAX_BATCH_TOTAL_TOKENS"
        )
    why = (
        "PLACEMENT=shard"
        if mode == "shard"
        else f"one copy ({sizes}) does not fit one GPU ({_gib(min(usable))} usable)"
    )
    return _shard_plan(gpus, usable, f"{why}: one copy split over {gpus} GPU(s) ({_gib(sum(usable))} usable)")


def _cpu_plan(mode: str, replicas: Optional[int]) -> PlacementPlan:
    if mode == "shard":
        return PlacementPlan(
            "shard", (EnginePlacement(("cpu",)),), "no GPU: nothing to split over; one copy on the CPU", ("cpu",)
        )
    count = replicas or 1
    reason = f"no GPU: {count} engine(s) on the CPU" + (" (REPLICAS)" if replicas else "")
    return PlacementPlan("replicas", tuple(EnginePlacement(("cpu",)) for _ in range(count)), reason, ("cpu",))


def _replica_plan(gpus: int, replicas: Optional[int], why: str) -> PlacementPlan:
    count = gpus if replicas is None else replicas
    if count > gpus:
        raise PlacementError(f"REPLICAS={count} needs {count} GPUs but SM_NUM_GPUS/visible GPUs give {gpus}")
    engines = tuple(EnginePlacement((f"cuda:{index}",), {"": index}) for index in range(count))
    return PlacementPlan(
        "replicas", engines, f"{why}: {count} replica(s), one per GPU", tuple(f"cuda:{i}" for i in range(count))
    )


def _shard_plan(gpus: int, usable: list[int], reason: str) -> PlacementPlan:
    devices = tuple(f"cuda:{index}" for index in range(gpus))
    if gpus == 1:
        return PlacementPlan("shard", (EnginePlacement(devices, {"": 0}),), reason, devices)
    # transformers balances "auto" over max_memory, so every GPU keeps room for its layers' share of the KV cache
    budget = {index: usable[index] for index in range(gpus)}
    return PlacementPlan("shard", (EnginePlacement(devices, "auto", budget),), reason, devices)
