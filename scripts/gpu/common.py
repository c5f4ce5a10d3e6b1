"""What the gpu-check stages share: the plan (shapes and sizes for GPU or CPU), model folders, results files."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts" / "gpu"))

CARRIED_TOKENIZER = ROOT / ".whl" / "tokenizer"  # written by fetch_wheels.sh; the GGUF itself does not travel


@dataclass(frozen=True)
class Plan:
    """Shapes and sizes of every stage: the real ones on a GPU, tiny ones for the CPU dry run."""

    gpu: bool
    device: str
    dtype: str
    shape: str  # the benchmark shape (dummy weights)
    batches: tuple[int, ...]  # engine step timing and the bandwidth floor
    context: int  # tokens in the KV cache per sequence for the floor
    prompt_tokens: int
    new_tokens: int
    step_tokens: int  # tokens per request when timing engine steps
    concurrencies: tuple[int, ...]  # the server stage
    hf_batches: tuple[int, ...]
    hf_compile: bool
    copy_mib: int
    compile_batches: tuple[int, ...] = (1,)  # the COMPILE stages (start-up, then these decode batches)
    workload_contexts: tuple[int, ...] = (16, 32, 64)  # the workloads stage: prompt tokens per request
    workload_concurrencies: tuple[int, ...] = (1, 2)  # requests decoding at once
    workload_new_tokens: int = 8  # per request; the timed window is its second quarter (time_batch)
    workload_prefix: tuple[int, int] = (48, 8)  # the shared-prefix workload: common prefix, distinct tail

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def nvidia_gpu_visible() -> bool:
    """True when nvidia-smi lists a GPU (asked without importing torch, so check.py itself stays light)."""
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return listing.returncode == 0 and "GPU" in listing.stdout


def make_plan(gpu: bool) -> Plan:
    """The GPU plan (Llama-3.1-8B shape, bf16), else the tiny CPU dry run."""
    if gpu:
        return Plan(
            True,
            "cuda:0",
            "bfloat16",
            "llama-3.1-8b",
            (1, 8, 32, 64),
            256,
            128,
            128,
            64,
            (1, 32, 64),
            (1, 32),
            True,
            2048,
            (1, 32),
            workload_contexts=(256, 2048, 8192),
            workload_concurrencies=(1, 32, 64),
            workload_new_tokens=64,
            workload_prefix=(4096, 128),
        )
    return Plan(False, "cpu", "float32", "tiny", (1, 4), 32, 16, 8, 8, (1, 4), (1, 2), False, 64)


@dataclass(frozen=True)
class ModelBytes:
    """What one decode step must read at least: every weight once, plus each sequence's KV cache."""

    parameters: int
    weight_bytes: int
    kv_bytes_per_token: int

    @classmethod
    def of(cls, plan: Plan, folder: Path) -> "ModelBytes":
        """The dummy-weights model in ``folder`` at the plan's dtype (the KV cache in the same dtype)."""
        from transformers import AutoConfig

        from serve.loading.placement import footprint, parameter_count

        config = AutoConfig.from_pretrained(str(folder))
        itemsize = 2 if plan.dtype in ("bfloat16", "float16") else 4
        kv_per_token = footprint(config, itemsize, itemsize).cache_bytes_per_token
        return cls(parameter_count(config), parameter_count(config) * itemsize, kv_per_token)

    def step_bytes(self, batch: int, context: int) -> int:
        """Bytes read by one decode step of ``batch`` sequences holding ``context`` tokens each."""
        return self.weight_bytes + batch * context * self.kv_bytes_per_token

    def floor_ms(self, batch: int, context: int, bytes_per_s: float) -> float:
        """The step's time if it only read those bytes at ``bytes_per_s``."""
        return self.step_bytes(batch, context) / bytes_per_s * 1000


def tokenizer_source() -> Path:
    """The carried tokenizer folder when present (GPU machine), else the embedded GGUF converted by the loader."""
    if (CARRIED_TOKENIZER / "tokenizer.json").is_file():
        return CARRIED_TOKENIZER
    from dummy_model import embedded_folder
    from serve.config import Settings

    return embedded_folder(Settings().cache_dir)


def model_folder(out: Path, shape: str) -> Path:
    """A dummy-weights folder of ``shape`` under ``out``/models (written once)."""
    from dummy_model import write_folder

    folder = out / "models" / shape
    if not (folder / "config.json").is_file():
        write_folder(folder, shape, tokenizer_source())
    return folder


def random_prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``count`` distinct prompts of ``length`` ordinary token ids (no prefix shared between them)."""
    rng = random.Random(seed)
    low = 64  # past the special tokens at the start of the embedded vocabulary
    return [[rng.randrange(low, vocab) for _ in range(length)] for _ in range(count)]


class Recorder:
    """A JSON object on disk, rewritten after every ``put`` so a killed stage keeps what it measured."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def stage_log(message: str) -> None:
    print(f"[gpu-check] {message}", flush=True)
