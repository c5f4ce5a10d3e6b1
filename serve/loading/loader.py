"""Load the model found by serve.loading.source onto its devices: dtype, quantization, placement, the lean model or
transformers, LoRA adapters attached; or dummy weights of the same shape (HF_MODEL_LOAD_FORMAT=dummy)."""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from serve.config import Settings
from serve.engine.types import CONTEXT_CAP, total_token_limit
from serve.loading.cpu_weights import pack_cpu_weights
from serve.loading.draft import load_draft, refuse_draft_with_tensor_parallel
from serve.loading.dummy import build_random, dummy_model  # noqa: F401 (build_random: scripts/gpu, tests/gpu)
from serve.loading.placement import MIN_CACHE_SLOTS, PlacementError, PlacementPlan, footprint, plan_placement
from serve.loading.quantize import Quantization, QuantizationError, resolve_quantization
from serve.loading.source import ModelLoadError, ModelSource, adapter_folders, local_folder, resolve_source

log = logging.getLogger(__name__)

# from_pretrained patches process-wide state (default dtype, weight init) while it runs: two engines of a pool
# loading at once in one process corrupt each other's weights, so copies load one after the other
_LOAD_LOCK = threading.Lock()


@dataclass
class LoadedModel:
    """A model ready for the engine."""

    model: Any
    tokenizer: Any
    name: str
    device: Any
    dtype: Any
    max_context: int
    plan: Optional[PlacementPlan] = None
    quantization: Optional[str] = None
    adapters: tuple[str, ...] = ()
    cpu_threads: Optional[int] = None  # torch's compute threads on the CPU
    cpu_weights: Optional[str] = None  # on the CPU: the kernel packed for, or dense, and why (layers.pack_for_cpu)
    ranks: Any = None  # serve.engine.ranks.RankGroup: the other tensor-parallel ranks of this copy
    draft: Any = None  # SPECULATIVE=draft: the draft model, on the target's device (serve.loading.draft)


def cpu_prefers_bf16(cpuinfo: Optional[str] = None) -> bool:
    """True when the CPU multiplies bfloat16 fast enough to prefer it (x86 AMX, Arm bf16, full 512-bit AVX-512 data
    paths); reads /proc/cpuinfo.

    ``avx512_bf16`` alone (256-bit data paths) does not count: there bf16 was slower than our packed float32 at small
    batches. With ``avx512_vp2intersect`` beside it (full 512-bit paths) bf16 was faster at every batch size
    (docs/settings.md, "dtype")."""
    from serve.modeling.cpu_kernel import cpu_flags

    flags = cpu_flags(cpuinfo)
    zen5 = {"avx512_bf16", "avx512_vp2intersect"} <= flags
    return zen5 or bool(flags & {"amx_bf16", "bf16"})


def model_context(config: Any) -> int:
    """The model's context in tokens: its config's ``max_position_embeddings``, else CONTEXT_CAP."""
    return int(getattr(config, "max_position_embeddings", 0) or CONTEXT_CAP)


def resolve_dtype(name: str, on_cuda: bool, cpu_bf16: Optional[bool] = None) -> Any:
    """``auto`` is bfloat16 on CUDA and on CPUs that prefer it (``cpu_prefers_bf16``), float32 on other CPUs;
    otherwise the named dtype."""
    import torch

    if name == "auto":
        prefers = cpu_prefers_bf16() if cpu_bf16 is None else cpu_bf16
        return torch.bfloat16 if on_cuda or prefers else torch.float32
    return getattr(torch, name)


def _visible_gpu_free_bytes() -> list[int]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count())]


@dataclass(frozen=True)
class PreparedModel:
    """A local folder plus the decisions made before loading: dtype, quantization and placement."""

    source: ModelSource
    folder: Path
    dtype: Any
    quantization: Quantization
    plan: PlacementPlan
    adapters: dict[str, Path] = field(default_factory=dict)

    def as_seen_by(self, index: int) -> "PreparedModel":
        """This model as copy ``index``'s engine process sees it: only its own GPUs visible, numbered from 0."""
        engines = list(self.plan.engines)
        engines[index] = engines[index].as_seen_inside()
        return replace(self, plan=replace(self.plan, engines=tuple(engines)))


def prepare_model(settings: Settings) -> PreparedModel:
    """Resolve and fetch the model, then decide dtype, quantization and placement from its config and the GPUs."""
    from transformers import AutoConfig

    from serve.loading.tensor_parallel import sharding_of

    source = resolve_source(settings)
    log.info("model source: %s %s", source.kind, source.location)
    folder = local_folder(source, settings)
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the model config in {folder}: {exc}") from exc
    free = _visible_gpu_free_bytes()
    on_cuda = bool(free)
    dtype = resolve_dtype(settings.dtype, on_cuda)
    try:
        quantization = resolve_quantization(settings.quantize, on_cuda, config, dtype)
        dtype_bytes = dtype.itemsize
        model = footprint(config, quantization.bytes_per_parameter or dtype_bytes, dtype_bytes)
        slot = total_token_limit(model_context(config), settings.max_total_tokens)
        cache_tokens = settings.max_batch_total_tokens or MIN_CACHE_SLOTS * slot
        sharding = sharding_of(settings, config, folder, quantization.method is not None)
        tensor_parallel = settings.tensor_parallel_size
        plan = plan_placement(
            settings.placement,
            settings.num_gpus,
            free,
            model,
            cache_tokens,
            settings.replicas,
            tensor_parallel,
            sharding,
        )
    except (PlacementError, QuantizationError) as exc:
        raise ModelLoadError(str(exc)) from exc
    log.info(
        "placement: %s on %s (PLACEMENT=%s): %s", plan.mode, ", ".join(plan.devices), settings.placement, plan.reason
    )
    return PreparedModel(source, folder, dtype, quantization, plan, adapter_folders(settings))


def load_model(settings: Settings, prepared: Optional[PreparedModel] = None, engine_index: int = 0) -> LoadedModel:
    """Load engine ``engine_index``'s copy of the model (preparing it first when not given); ModelLoadError on
    failure."""
    from serve.engine.lora import AdapterError, attach_adapters

    started = time.monotonic()
    prepared = prepared or prepare_model(settings)
    placement = prepared.plan.engines[engine_index]
    if placement.tensor_parallel > 1:
        return _load_parallel(settings, prepared, engine_index, started)
    on_cpu = all(device == "cpu" for device in placement.devices)
    cpu_threads = use_cpu_threads(settings.torch_threads) if on_cpu else None
    kwargs = {**placement.from_pretrained_kwargs(), **prepared.quantization.kwargs}
    where = ", ".join(placement.devices)
    log.info("loading %s from %s as %s on %s", prepared.source.name, prepared.folder, prepared.dtype, where)
    with _LOAD_LOCK:
        if settings.load_format == "dummy":
            model, tokenizer = dummy_model(prepared, settings, placement.devices)  # serve.loading.dummy
        else:
            lean = _load_lean(prepared, settings, placement)
            model, tokenizer = lean or _from_pretrained(prepared.folder, settings, prepared.dtype, kwargs)
    cpu_weights = pack_cpu_weights(model, settings) if on_cpu else None
    try:
        attach_adapters(model, prepared.adapters, settings.max_lora_rank)
    except AdapterError as exc:
        raise ModelLoadError(str(exc)) from exc
    max_context = model_context(model.config)
    log.info(
        "model loaded in %.1f s: %s on %s, context %d tokens",
        time.monotonic() - started,
        prepared.source.name,
        model.device,
        max_context,
    )
    return LoadedModel(
        model,
        tokenizer,
        prepared.source.name,
        model.device,
        prepared.dtype,
        max_context,
        plan=prepared.plan,
        quantization=prepared.quantization.method,
        adapters=tuple(prepared.adapters),
        cpu_threads=cpu_threads,
        cpu_weights=cpu_weights,
        draft=load_draft(settings, prepared, model, tokenizer),
    )


def _load_parallel(settings: Settings, prepared: PreparedModel, engine_index: int, started: float) -> LoadedModel:
    """One copy as tensor-parallel shards (serve.loading.tensor_parallel): rank 0's shard here, the others in
    processes of their own."""
    from serve.loading.tensor_parallel import load_parallel

    refuse_draft_with_tensor_parallel(settings, prepared.plan.engines[engine_index].tensor_parallel)
    model, ranks, threads = load_parallel(settings, prepared, engine_index)
    tokenizer = _tokenizer(prepared.folder, settings)
    log.info(
        "model loaded in %.1f s: %s, %d tensor-parallel ranks",
        time.monotonic() - started,
        prepared.source.name,
        ranks.size,
    )
    return LoadedModel(
        model,
        tokenizer,
        prepared.source.name,
        model.device,
        prepared.dtype,
        model_context(model.config),
        plan=prepared.plan,
        adapters=tuple(prepared.adapters),
        cpu_threads=threads,
        cpu_weights=getattr(model, "serve_cpu_weights", None),
        ranks=ranks,
    )


def use_cpu_threads(requested: Optional[int], cores: Optional[int] = None) -> int:
    """The engine's torch compute threads on the CPU, set on the calling (engine) thread: TORCH_THREADS, or every
    core. On 2 cores with the oneDNN-packed weights, 2 threads beat 1 at every concurrency, the HTTP side included
    (docs/settings.md, "Torch threads"). On a machine
    shared with other busy work, one thread fewer than the free cores avoids waiting at every op for a descheduled
    thread."""
    import torch

    cores = cores or len(os.sched_getaffinity(0))
    threads = requested or cores
    torch.set_num_threads(threads)
    log.info("torch computes on %d thread(s) of %d core(s)", threads, cores)
    return threads


def lean_fallback_reason(prepared: PreparedModel, settings: Settings, placement: Any, config: Any) -> Optional[str]:
    """Why this model, as configured, is served by transformers' model code rather than serve/modeling/ (None: lean)."""
    from serve.modeling import safetensors_files, unsupported_reason

    if not settings.lean_model:
        return "LEAN_MODEL=false"
    if prepared.quantization.method is not None:
        return f"quantization {prepared.quantization.method} is loaded by transformers"
    if len(placement.devices) != 1:
        return f"the model is split over {len(placement.devices)} devices (accelerate places it)"
    if settings.trust_remote_code and getattr(config, "auto_map", None):
        return "the checkpoint brings its own model code (HF_MODEL_TRUST_REMOTE_CODE=true)"
    if not safetensors_files(prepared.folder):
        return "the lean loader reads safetensors weights only"
    return unsupported_reason(config)


def _load_lean(prepared: PreparedModel, settings: Settings, placement: Any) -> Optional[tuple[Any, Any]]:
    """(model, tokenizer) from serve/modeling/ when it can serve this model exactly; None (reason logged) otherwise."""
    from transformers import AutoConfig

    from serve.modeling import CheckpointMismatch, load_pretrained

    config = AutoConfig.from_pretrained(str(prepared.folder), trust_remote_code=settings.trust_remote_code)
    reason = lean_fallback_reason(prepared, settings, placement, config)
    if reason is None:
        tokenizer = _tokenizer(prepared.folder, settings)
        try:
            model = load_pretrained(prepared.folder, config, placement.devices[0], prepared.dtype)
            log.info("lean model: %s (%s) served by serve/modeling/", type(model).__name__, config.model_type)
            return model, tokenizer
        except CheckpointMismatch as exc:
            reason = f"the checkpoint does not fit the lean model: {exc}"
    log.info("transformers model code serves %s: %s", config.model_type, reason)
    return None


def load_tokenizer(settings: Settings, prepared: PreparedModel) -> Any:
    """The model's tokenizer, from the folder ``prepare_model`` fetched (a .gguf already converted there): what the
    front tokenizes with, the engine process loading its own beside the weights."""
    tokenizer = _tokenizer(prepared.folder, settings)
    tokenizer.serve_image_prompt()  # now: a vision-language model whose processor cannot load fails the start
    return tokenizer


def _tokenizer(folder: Path, settings: Settings) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the tokenizer in {folder}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # how the model takes images (serve.front.images.image_prompt_of), built on first use: by the front, never in an
    # engine process, which is handed the images' arrays
    tokenizer.serve_image_prompt = functools.cache(lambda: _image_prompt(folder, tokenizer, settings))
    return tokenizer


def _image_prompt(folder: Path, tokenizer: Any, settings: Settings) -> Any:
    """How the model takes images (serve.loading.vision), None for a text-only model."""
    from transformers import AutoConfig

    from serve.loading.vision import image_prompt

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the model's config in {folder}: {exc}") from exc
    return image_prompt(folder, config, tokenizer, settings.trust_remote_code)


def _from_pretrained(folder: Path, settings: Settings, dtype: Any, extra: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    trust = settings.trust_remote_code
    try:
        tokenizer = _tokenizer(folder, settings)
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust)
        vision = getattr(config, "vision_config", None) is not None  # a vision-language model, images and text
        auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        model = auto.from_pretrained(
            str(folder),
            dtype=dtype,
            trust_remote_code=trust,
            use_safetensors=None if settings.allow_unsafe_weights else True,
            **extra,
        )
    except (OSError, ValueError) as exc:
        hint = (
            ""
            if settings.allow_unsafe_weights
            else " (pickle weights, *.bin and *.pt, are refused: only safetensors load unless "
            "ALLOW_PICKLE_WEIGHTS=true)"
        )
        raise ModelLoadError(f"could not load the model in {folder}: {exc}{hint}") from exc
    model.eval()
    return model, tokenizer
