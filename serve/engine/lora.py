"""LoRA adapters served side by side: every token of a step adds the low-rank delta of its own request's adapter.

The runner flattens a step's tokens (of all requests) into one [1, N] forward, so adapters cannot be merged into
the weights. Instead each targeted linear layer is wrapped: ``y = W x`` for all tokens, then for each adapter
present in the step, ``y[tokens of that adapter] += scale * B (A x)``. The runner sets the per-token adapter
index before each forward (``begin_step``); index 0 is the base model. Adapters are read from peft's files
(``adapter_config.json`` + ``adapter_model.safetensors``); plain LoRA on linear layers only.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from serve.engine.adapters import AdapterError, check_config
from serve.engine.fused import find_part

PEFT_PREFIX = "base_model.model."
WEIGHT_FILES = ("adapter_model.safetensors",)


@dataclass
class LoraWeights:
    """One adapter's matrices for one linear layer: delta = scale * B @ A."""

    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    scale: float


@dataclass
class AdapterWeights:
    """One adapter's weights ({module path: LoRA weights}) and its install number, which the engine keys its
    prefix-cache blocks by (a name deleted and registered again gets a new number, so it never meets the old one's
    blocks)."""

    number: int
    modules: dict[str, LoraWeights]


CONFIG_MAX_BYTES = 1 << 20  # an adapter_config.json is a few hundred bytes; more is not a peft config


def read_adapter(name: str, folder: Path, max_rank: Optional[int] = None) -> dict[str, LoraWeights]:
    """{module path in the model: weights} for a peft LoRA folder; AdapterError for what we cannot serve.

    Every config field and tensor shape is checked here, before anything is linked into the model."""
    config_path, weights_path = folder / "adapter_config.json", folder / WEIGHT_FILES[0]
    if not _regular(config_path) or not _regular(weights_path):
        raise AdapterError(f"adapter {name!r}: {folder} needs adapter_config.json and {WEIGHT_FILES[0]}")
    rank, scale = check_config(name, _read_config(name, config_path), max_rank)
    modules: dict[str, LoraWeights] = {}
    tensors = _read_tensors(name, weights_path)
    for key in tensors:
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise AdapterError(
                f"adapter {name!r}: unsupported weight {key} (only LoRA A/B of linear layers are served)"
            )
        pair = key.replace(".lora_B.", ".lora_A.") if ".lora_B." in key else key.replace(".lora_A.", ".lora_B.")
        if pair not in tensors:
            raise AdapterError(f"adapter {name!r}: {key} has no matching {pair.rsplit('.', 2)[-2]} weight")
        if key.endswith(".lora_A.weight"):
            a, b = tensors[key], tensors[pair]
            check_pair(name, key[: -len(".lora_A.weight")], a, b, rank)
            modules[key[: -len(".lora_A.weight")].removeprefix(PEFT_PREFIX)] = LoraWeights(a, b, scale)
    if not modules:
        raise AdapterError(f"adapter {name!r}: {weights_path} holds no LoRA weights")
    return modules


def _regular(path: Path) -> bool:
    """A regular file (never a device, FIFO or folder, wherever a link points)."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _read_config(name: str, path: Path) -> Any:
    if path.stat().st_size > CONFIG_MAX_BYTES:
        raise AdapterError(f"adapter {name!r}: adapter_config.json is larger than {CONFIG_MAX_BYTES} bytes")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not valid JSON: {reason}") from None


def _read_tensors(name: str, path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a malformed file
        raise AdapterError(f"adapter {name!r}: {path.name} holds no readable tensors: {exc}") from None


def check_pair(name: str, module: str, a: torch.Tensor, b: torch.Tensor, rank: int) -> None:
    """lora_A [r, in] and lora_B [out, r] of one module: floating point, finite, two-dimensional, rank ``r``."""
    for part, tensor in (("lora_A", a), ("lora_B", b)):
        field = f"adapter {name!r}: {module}.{part}"
        if tensor.ndim != 2 or 0 in tensor.shape:
            raise AdapterError(f"{field} must be a 2-D matrix, not of shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise AdapterError(f"{field} must hold floating-point numbers, not {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterError(f"{field} holds values that are not finite (NaN or infinity)")
    if a.shape[0] != rank or b.shape[1] != rank:
        raise AdapterError(
            f"adapter {name!r}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
            f"both must have rank r={rank} (lora_A [r, in], lora_B [out, r])"
        )


class LoraLinear(nn.Module):
    """A linear layer plus the LoRA deltas of several adapters, applied per token.

    A fused layer (q/k/v or gate/up in one matmul, ``parts`` naming their output slices) takes each adapter's
    delta of a part on that part's slice of the output.
    """

    def __init__(self, base: nn.Linear, router: "LoraSet"):
        super().__init__()
        self.base = base
        self.router = router
        self.adapters: dict[int, list[tuple[LoraWeights, slice]]] = {}

    @property
    def weight(self) -> torch.Tensor:  # model code that reads a projection's weight still finds it
        return self.base.weight

    def add(self, index: int, weights: LoraWeights, out: slice) -> None:
        """Adapter ``index``'s delta on output features ``out`` of this layer."""
        self.adapters.setdefault(index, []).append((weights, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.router.token_adapters is None or not self.adapters:
            return out
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        for index in self.router.step_adapters:
            deltas = self.adapters.get(index)
            if not deltas:
                continue
            rows = self.router.rows(index, x.device)
            picked = flat_x.index_select(0, rows)
            for weights, part in deltas:
                delta = (picked @ weights.a.T) @ weights.b.T
                flat_out[:, part].index_add_(0, rows, delta.to(flat_out.dtype), alpha=weights.scale)
        return out


class LoraSet:
    """The adapters of one model: names, the wrapped layers, and the adapter of every token of the current step.

    Adapters may be installed and removed between steps (``install``/``remove``, on the engine thread); each is
    indexed by its install number (the adapters given at load are numbered 1..n in order; the front's registry
    numbers those it registers later), so removing one never renumbers the others.
    """

    def __init__(self, model: nn.Module, adapters: dict[str, dict[str, LoraWeights]]):
        self.model = model
        self._indices: dict[str, int] = {}  # name -> install number; 0 is the base model
        self.token_adapters: Optional[torch.Tensor] = None
        self.step_adapters: list[int] = []
        self._rows: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._device = next(model.parameters()).device
        self.layers: dict[str, LoraLinear] = {}
        self.on_remove: Optional[Callable[[str], None]] = None  # told of each removal (the other tensor-parallel ranks)
        for number, (name, modules) in enumerate(adapters.items(), 1):
            self.install(name, prepare_adapter(model, name, AdapterWeights(number, modules)))

    @property
    def names(self) -> list[str]:
        return list(self._indices)

    @property
    def numbers(self) -> dict[str, int]:
        """Each adapter's install number, by name."""
        return dict(self._indices)

    def install(self, name: str, prepared: AdapterWeights) -> None:
        """Add an adapter whose weights ``prepare_adapter`` already checked and placed (cheap: no copies)."""
        if name in self._indices:
            raise AdapterError(f"adapter {name!r} is already loaded")
        if prepared.number <= 0 or prepared.number in self._indices.values():
            raise AdapterError(f"adapter {name!r}: install number {prepared.number} is taken")
        for path, weights in prepared.modules.items():
            target = _target(self.model, path, name)
            layer = self._wrap(target)
            self.layers[target.layer_path] = layer
            layer.add(prepared.number, weights, target.out)
        self._indices[name] = prepared.number

    def remove(self, name: str) -> None:
        """Drop an adapter's weights (no request may be using it: the engine waits for that)."""
        index = self._indices.pop(name)
        if self.on_remove is not None:
            self.on_remove(name)
        for layer in self.layers.values():
            layer.adapters.pop(index, None)
        if self._device.type == "cuda":
            torch.cuda.empty_cache()  # hand the adapter's memory back, not just to torch's cache

    def _wrap(self, target: "Target") -> LoraLinear:
        current = getattr(target.parent, target.attribute)
        if isinstance(current, LoraLinear):
            return current
        layer = LoraLinear(current, self)
        setattr(target.parent, target.attribute, layer)
        return layer

    def index(self, adapter: Optional[str]) -> int:
        return 0 if adapter is None else self._indices[adapter]

    def begin_step(self, adapters_per_token: Iterable[Optional[str]]) -> None:
        """Set the adapter of every token of the next forward (in the runner's flattened order)."""
        indices = [self.index(adapter) for adapter in adapters_per_token]
        self.step_adapters = sorted(set(indices) - {0})
        self.token_adapters = (
            torch.tensor(indices, dtype=torch.long, device=self._device) if self.step_adapters else None
        )
        self._rows: dict[tuple[int, torch.device], torch.Tensor] = {}

    def rows(self, index: int, device: torch.device) -> torch.Tensor:
        """The step's token rows that use adapter ``index``, on ``device`` (computed once per step and device)."""
        key = (index, device)
        if key not in self._rows:
            self._rows[key] = (self.token_adapters == index).nonzero().squeeze(1).to(device)
        return self._rows[key]


@dataclass
class Target:
    """Where an adapter's module path lands: a linear layer, or a slice of a fused one (lean models fuse q/k/v and
    gate/up; the fused layer's ``parts`` name its slices)."""

    parent: nn.Module
    attribute: str
    layer_path: str
    base: nn.Linear
    out: slice

    @property
    def rows(self) -> int:
        return len(range(self.base.weight.shape[0])[self.out])


def _target(model: nn.Module, path: str, name: str) -> Target:
    """The linear layer (or fused slice) an adapter's ``path`` targets, inside a LoRA wrapper if one is there."""
    parent_path, _, child = path.rpartition(".")
    try:
        parent = model.get_submodule(parent_path)
    except AttributeError:
        raise AdapterError(f"adapter {name!r} targets {path}, which this model does not have") from None
    attribute, out = child, slice(None)
    if not isinstance(getattr(parent, child, None), nn.Module):
        fused = find_part(parent, child)
        if fused is None:
            raise AdapterError(f"adapter {name!r} targets {path}, which this model does not have")
        attribute, _, out = fused
    base = getattr(parent, attribute)
    base = base.base if isinstance(base, LoraLinear) else base
    if not isinstance(base, nn.Linear):
        raise AdapterError(f"adapter {name!r} targets {path}, a {type(base).__name__}; only linear layers are served")
    layer_path = f"{parent_path}.{attribute}" if parent_path else attribute
    return Target(parent, attribute, layer_path, base, out)


def prepare_adapter(model: nn.Module, name: str, adapter: AdapterWeights) -> AdapterWeights:
    """Check an adapter's shapes against the model and move its weights to each layer's device and dtype.

    Runs on the thread that installs the adapter (reads only the model), so the engine thread just links them in.
    """
    prepared: dict[str, LoraWeights] = {}
    shard = getattr(model, "serve_shard", None)  # a tensor-parallel rank's model takes its share of each pair
    for path, weights in adapter.modules.items():
        target = _target(model, path, name)
        weight = target.base.weight
        a, b = weights.a, weights.b
        if shard is not None and a.ndim == b.ndim == 2:
            a, b = shard.adapter(path, a, b)
        fits = (
            a.ndim == b.ndim == 2
            and a.shape[0] == b.shape[1]
            and (b.shape[0], a.shape[1]) == (target.rows, weight.shape[1])
        )
        if not fits:
            shapes = f"{tuple(b.shape)}x{tuple(a.shape)}"
            raise AdapterError(f"adapter {name!r}: {path} shapes {shapes} do not fit {(target.rows, weight.shape[1])}")
        placed = LoraWeights(a.to(weight), b.to(weight), weights.scale)
        if not (bool(torch.isfinite(placed.a).all()) and bool(torch.isfinite(placed.b).all())):
            raise AdapterError(f"adapter {name!r}: {path} holds values too large for the model's {weight.dtype}")
        prepared[path] = placed
    return AdapterWeights(adapter.number, prepared)


def attach_adapters(model: nn.Module, folders: dict[str, Path], max_rank: Optional[int] = None) -> LoraSet:
    """Read every adapter and wrap the model's targeted linear layers; the set is also ``model.serve_lora``.

    The set is attached even without adapters, so that adapters registered at run time have one to join.
    """
    lora = LoraSet(model, {name: read_adapter(name, Path(folder), max_rank) for name, folder in folders.items()})
    model.serve_lora = lora
    return lora
