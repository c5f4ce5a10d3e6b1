"""Checkpoint weights straight into the lean model's fused layout, one safetensors tensor at a time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from serve.engine.fused import find_part
from serve.modeling.parallel import VOCAB_PARTS

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed from the config


class CheckpointMismatch(ValueError):
    """The checkpoint's tensors do not fit the lean model (missing, unexpected or misshapen); the message says which."""


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: those the index names, else every ``*.safetensors`` (empty: none)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


def _tensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, Any]]:
    """Each checkpoint tensor as a safetensors slice: indexing it reads only the rows asked for (a tensor-parallel
    rank's share), ``[:]`` the whole tensor."""
    from safetensors import safe_open

    for path in files:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            for name in handle.keys():
                yield name, handle.get_slice(name)


def _destination(model: nn.Module, name: str) -> torch.Tensor:
    """The parameter, or the slice of a fused parameter, that checkpoint tensor ``name`` fills."""
    module_path, _, attribute = name.rpartition(".")
    parent_path, _, child = module_path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path)
    except AttributeError:
        raise CheckpointMismatch(f"unexpected tensor {name}") from None
    module = getattr(parent, child, None)
    if isinstance(module, nn.Module) and isinstance(getattr(module, attribute, None), torch.Tensor):
        return getattr(module, attribute)
    fused = find_part(parent, child)
    if fused is None or not isinstance(getattr(fused[1], attribute, None), torch.Tensor):
        raise CheckpointMismatch(f"unexpected tensor {name}")
    _, layer, part = fused
    return getattr(layer, attribute)[part]


def expected_keys(model: nn.Module) -> set[str]:
    """Checkpoint tensor names the model needs: its parameters, fused ones split into their parts."""
    keys: set[str] = set()
    tied = getattr(model, "tied", False)
    for name, _ in model.named_parameters(remove_duplicate=False):
        if tied and name == "lm_head.weight":
            continue
        module_path, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_path)
        parts = getattr(module, "parts", None)
        if parts:
            parent_path = module_path.rpartition(".")[0]
            keys.update(f"{parent_path}.{part}.{attribute}" for part in parts)
        else:
            keys.add(name)
    return keys


@torch.no_grad()
def load_checkpoint(model: nn.Module, folder: Path) -> None:
    """Copy every safetensors tensor of ``folder`` into ``model`` (cast to its dtype); CheckpointMismatch when a
    tensor is missing, unexpected or of the wrong shape."""
    files = safetensors_files(folder)
    if not files:
        raise CheckpointMismatch(f"{folder} holds no safetensors weights")
    load_tensors(model, _tensors(files, next(model.parameters()).device))


@torch.no_grad()
def load_tensors(model: nn.Module, tensors: Iterable[tuple[str, Any]]) -> None:
    """Copy named checkpoint tensors (a safetensors file's slices, or a transformers model's state dict) into
    ``model``; a tensor-parallel shard (``model.serve_shard``) takes only its slice of each."""
    needed = expected_keys(model)
    tied = getattr(model, "tied", False)
    shard = getattr(model, "serve_shard", None)
    for name, source in tensors:
        if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        target = _destination(model, name)
        tensor = source[:] if shard is None else shard.take(name, source)
        _fill(target, tensor, name, padded=shard is not None and name.split(".")[-2] in VOCAB_PARTS)
        needed.discard(name)
    if needed:
        raise CheckpointMismatch(f"the checkpoint lacks {len(needed)} tensor(s), e.g. {', '.join(sorted(needed)[:3])}")


def _fill(target: torch.Tensor, tensor: torch.Tensor, name: str, padded: bool) -> None:
    """Copy ``tensor`` into ``target``; a vocabulary shard's rows past the vocabulary (``padded``) stay zero."""
    rows = tensor.shape[0] if padded and tensor.shape[1:] == target.shape[1:] else target.shape[0]
    if tensor.shape != target[:rows].shape or rows > target.shape[0]:
        raise CheckpointMismatch(
            f"tensor {name} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
        )
    target[:rows].copy_(tensor)
    target[rows:].zero_()


def load_pretrained(folder: Path, config: Any, device: Any, dtype: torch.dtype, parallel: Any = None) -> Any:
    """The lean model of ``config`` with the checkpoint's weights, on ``device`` in ``dtype``; with ``parallel``
    (serve.modeling.parallel.TensorParallel) this rank's shard, read from the slices it holds."""
    from transformers import GenerationConfig

    from serve.modeling.llama import LlamaForServing

    model = LlamaForServing(config, device, dtype, parallel)
    load_checkpoint(model, folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    else:
        model.generation_config = GenerationConfig.from_model_config(config)
    return model
