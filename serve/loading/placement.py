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
    """Where one engine's copy of the model lives: its devices (as the server sees them), and either
    ``from_pretrained`` placement arguments (one GPU, or accelerate's split) or ``tensor_parallel`` ranks, one per
    device."""

    devices: tuple[str, ...]
    device_map: Any = None
    max_memory: Optional[dict[int, int]] = None
    tensor_parallel: int = 1

    def gpu_indices(self) -> list[int]:
        """The GPU ordinals of this copy, in order (empty on the CPU)."""
        return [int(device.split(":")[1]) for device in self.devices if device.startswith("cuda:")]

    def as_seen_inside(self) -> "EnginePlacement":
        """This placement as the engine process sees it once only its GPUs are visible: cuda:0..k-1."""
        indices = self.gpu_indices()
        if not indices:
            return self
        local = {index: position for position, index in enumerate(indices)}
        device_map = {"": local[self.device_map[""]]} if isinstance(self.device_map, dict) else self.device_map
        memory = None if self.max_memory is None else {local[i]: size for i, size in self.max_memory.items()}
        devices = tuple(f"cuda:{position}" for position in range(len(indices)))
        return EnginePlacement(devices, device_map, memory, self.tensor_parallel)

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
            "tensor_parallel_size": self.engines[0].tensor_parallel if self.engines else 1,
        }


def visible_devices(placement: EnginePlacement, server_visible: Optional[str]) -> Optional[str]:
    """CUDA_VISIBLE_DEVICES for a copy's engine process: its GPUs in order, named as the server's own list names
    them (``server_visible``: the server's CUDA_VISIBLE_DEVICES, if set). None on the CPU."""
    indices = placement.gpu_indices()
    if not indices:
        return None
    names = [name.strip() for name in server_visible.split(",")] if server_visible else None
    return ",".join(names[index] if names else str(index) for index in indices)


def _gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB"


@dataclass(frozen=True)
class Sharding:
    """How the lean model can split this model by tensor parallelism: the rank counts that divide its heads and
    features (``sizes``), or why it cannot at all (``why_not``: another architecture, a quantized checkpoint...)."""

    sizes: tuple[int, ...] = ()
    why_not: Optional[str] = None


def plan_placement(
    mode: str,
    num_gpus: Optional[int],
    free_bytes_per_gpu: list[int],
    model: Footprint,
    cache_tokens: int,
    replicas: Optional[int] = None,
    tensor_parallel: Optional[int] = None,
    sharding: Sharding = Sharding(why_not="not known to split"),
) -> PlacementPlan:
    """Replicas, tensor parallelism or accelerate's split (``mode`` auto: a model too big for one GPU gets the
    smallest power-of-two tensor-parallel size whose share fits each GPU, then as many copies as fit; accelerate's
    split only where the lean model cannot split it), or check the one asked for; PlacementError if nothing fits.
    ``cache_tokens``: the KV-cache room one engine needs (MAX_BATCH_TOTAL_TOKENS, else a few full-length slots)."""
    visible = len(free_bytes_per_gpu)
    gpus = visible if num_gpus is None else num_gpus
    if gpus > visible:
        raise PlacementError(f"SM_NUM_GPUS={gpus} but only {visible} GPU(s) are visible")
    if gpus == 0:
        return _cpu_plan(mode, replicas, _checked_size(tensor_parallel, sharding, gpus=None))
    usable = [int(free * WEIGHT_AND_CACHE_FRACTION) for free in free_bytes_per_gpu[:gpus]]
    need = model.need(cache_tokens)
    fits_one = need <= min(usable)
    kv_bytes = _gib(need - model.weight_bytes)
    sizes = f"{_gib(model.weight_bytes)} of weights + {kv_bytes} of KV cache for {cache_tokens} tokens"
    if tensor_parallel and tensor_parallel > 1:
        size = _checked_size(tensor_parallel, sharding, gpus)
        return _tensor_parallel_plan(size, gpus, usable, need, replicas, f"TENSOR_PARALLEL_SIZE={size} ({sizes})")
    if mode == "replicas" or (mode == "auto" and fits_one):
        if not fits_one:
            raise PlacementError(
                f"PLACEMENT=replicas: one copy needs {sizes}, more than one GPU's usable {_gib(min(usable))}; "
                "use PLACEMENT=auto (tensor parallelism), HF_MODEL_QUANTIZE, or a lower MAX_BATCH_TOTAL_TOKENS"
            )
        return _replica_plan(gpus, replicas, f"one copy ({sizes}) fits one GPU ({_gib(min(usable))} usable)")
    too_big = f"one copy ({sizes}) does not fit one GPU ({_gib(min(usable))} usable)"
    size = _smallest_fitting_size(sharding, gpus, min(usable), need) if mode == "auto" else None
    if size is not None:
        return _tensor_parallel_plan(size, gpus, usable, need, replicas, too_big)
    if need > sum(usable):
        raise PlacementError(
            f"the model needs {sizes}, more than the {_gib(sum(usable))} usable on {gpus} GPU(s); "
            "use more or larger GPUs, HF_MODEL_QUANTIZE, or a lower MAX_TOTAL_TOKENS/MAX_BATCH_TOTAL_TOKENS"
        )
    why = (
        "PLACEMENT=shard"
        if mode == "shard"
        else f"{too_big}; no tensor parallelism: {sharding.why_not or 'no size fits'}"
    )
    return _shard_plan(gpus, usable, f"{why}: one copy split over {gpus} GPU(s) by layers ({_gib(sum(usable))} usable)")


def _checked_size(size: Optional[int], sharding: Sharding, gpus: Optional[int]) -> int:
    """TENSOR_PARALLEL_SIZE checked against the model and the GPUs (1 when unset)."""
    if not size or size == 1:
        return 1
    if sharding.why_not is not None:
        raise PlacementError(f"TENSOR_PARALLEL_SIZE={size}: the lean model cannot split this model: {sharding.why_not}")
    if size not in sharding.sizes:
        raise PlacementError(
            f"TENSOR_PARALLEL_SIZE={size}: the model's heads and features do not divide over {size} ranks "
            f"(sizes that do: {', '.join(map(str, sharding.sizes)) or 'none'})"
        )
    if gpus is not None and size > gpus:
        raise PlacementError(f"TENSOR_PARALLEL_SIZE={size} needs {size} GPUs but SM_NUM_GPUS/visible GPUs give {gpus}")
    return size


def _smallest_fitting_size(sharding: Sharding, gpus: int, usable: int, need: int) -> Optional[int]:
    """The smallest power-of-two rank count (up to ``gpus``) whose share of ``need`` fits one GPU's ``usable``."""
    if sharding.why_not is not None:
        return None
    for size in sorted(size for size in sharding.sizes if size > 1 and size & (size - 1) == 0 and size <= gpus):
        if -(-need // size) <= usable:
            return size
    return None


def _tensor_parallel_plan(
    size: int, gpus: int, usable: list[int], need: int, replicas: Optional[int], why: str
) -> PlacementPlan:
    """``replicas`` (default: as many as fit) copies of ``size`` ranks each, on consecutive GPUs."""
    share = -(-need // size)
    if share > min(usable):
        raise PlacementError(
            f"{why}: each of {size} GPUs would need {_gib(share)}, more than its usable {_gib(min(usable))}; "
            "use a larger TENSOR_PARALLEL_SIZE, HF_MODEL_QUANTIZE, or a lower MAX_BATCH_TOTAL_TOKENS"
        )
    copies = replicas or gpus // size
    if copies * size > gpus:
        raise PlacementError(f"REPLICAS={copies} of {size} ranks need {copies * size} GPUs; there are {gpus}")
    engines = tuple(
        EnginePlacement(tuple(f"cuda:{copy * size + rank}" for rank in range(size)), tensor_parallel=size)
        for copy in range(copies)
    )
    each = f"each GPU holding {_gib(share)} of {_gib(min(usable))} usable"
    reason = f"{why}: {copies} copy(ies) of {size} tensor-parallel ranks, {each}"
    devices = tuple(device for engine in engines for device in engine.devices)
    return PlacementPlan("tensor-parallel", engines, reason, devices)


def _cpu_plan(mode: str, replicas: Optional[int], tensor_parallel: int = 1) -> PlacementPlan:
    if tensor_parallel > 1:
        count = replicas or 1
        engines = tuple(EnginePlacement(("cpu",), tensor_parallel=tensor_parallel) for _ in range(count))
        reason = f"no GPU: {count} engine(s) of {tensor_parallel} tensor-parallel ranks on the CPU (gloo)"
        return PlacementPlan("tensor-parallel", engines, reason, ("cpu",))
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
