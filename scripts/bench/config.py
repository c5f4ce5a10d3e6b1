"""Benchmark settings, read once from BENCH_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from peer_configs import TRANSFORMERS_CONFIGS, VLLM_CONFIGS

REPO = Path(__file__).resolve().parents[2]
ALL_SYSTEMS = ("ours", "vllm", "transformers", "offline", "ours-slots", "ours-nocache", "ours-before", "ours-nospec")
ALL_WORKLOADS = ("standard", "capacity", "prefix", "speculative")
DEFAULT_WORK_DIR = Path.home() / ".cache" / "sagemaker-llm-serve" / "bench"


@dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run needs to know; see ``from_env`` for the variables."""

    systems: tuple[str, ...] = ALL_SYSTEMS
    concurrency: tuple[int, ...] = (1, 8, 32)
    requests_per_client: int = 2
    min_requests: int = 8
    fixed_requests: int | None = None
    max_tokens: int = 64
    max_model_len: int = 2048
    peer_timeout_s: float = 900.0
    health_timeout_s: float = 600.0
    install_timeout_s: float = 1800.0
    request_timeout_s: float = 300.0
    work_dir: Path = DEFAULT_WORK_DIR
    output_md: Path = REPO / "docs" / "benchmarks.md"
    output_json: Path = REPO / "docs" / "benchmarks.json"
    vllm_version: str = "0.32.0"
    transformers_version: str = ""  # "": the project venv's version
    vllm_configs: tuple[str, ...] = VLLM_CONFIGS  # the vLLM rows of the standard workload (peer_configs.py)
    transformers_configs: tuple[str, ...] = TRANSFORMERS_CONFIGS
    torch_version: str = ""  # "": the project venv's version (its local CPU wheel)
    workloads: tuple[str, ...] = ALL_WORKLOADS
    # capacity: many concurrent long-ish prompts through a fixed KV budget
    capacity_requests: int = 64
    capacity_concurrency: int = 64
    capacity_prompt_tokens: tuple[int, ...] = (200, 600)
    capacity_max_tokens: int = 64
    capacity_kv_tokens: int = 32768  # MAX_BATCH_TOTAL_TOKENS (ours) and vLLM's --kv-cache-memory-bytes
    capacity_max_model_len: int = 4096  # MAX_TOTAL_TOKENS (ours) and vLLM's --max-model-len
    slots_commit: str = "9585df6"  # ours-slots: the slot-per-sequence engine, run from a git worktree
    before_commit: str = "HEAD~1"  # ours-before: an earlier commit of this repo (what a change cost or saved)
    # prefix: one long shared system prompt, different short questions
    prefix_concurrency: tuple[int, ...] = (1, 8)
    prefix_requests: int = 40
    prefix_system_tokens: int = 1000
    prefix_max_tokens: int = 32

    def requests_at(self, concurrency: int) -> int:
        """How many requests one concurrency level sends."""
        if self.fixed_requests:
            return self.fixed_requests
        return max(concurrency * self.requests_per_client, self.min_requests)

    @property
    def log_dir(self) -> Path:
        return self.work_dir / "logs"


def _ints(raw: str) -> tuple[int, ...]:
    """Parse "1,8,32" into (1, 8, 32); every value must be positive."""
    values = tuple(int(part) for part in raw.replace(" ", "").split(",") if part)
    if not values or min(values) <= 0:
        raise ValueError(f"expected positive integers separated by commas, got {raw!r}")
    return values


def _names(variable: str, known: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    """A parser of "a,b" for ``variable`` that rejects names not in ``known``."""

    def parse(raw: str) -> tuple[str, ...]:
        names = tuple(part.strip().lower() for part in raw.split(",") if part.strip())
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise ValueError(f"{variable}: unknown {unknown or raw!r}; choose from {', '.join(known)}")
        return names

    return parse


def _token_range(raw: str) -> tuple[int, ...]:
    """Parse "200,600" into (200, 600): the shortest and longest prompt."""
    values = _ints(raw)
    if len(values) != 2 or values[0] > values[1]:
        raise ValueError(f"BENCH_CAPACITY_PROMPT_TOKENS: expected MIN,MAX, got {raw!r}")
    return values


def from_env(env: Mapping[str, str] | None = None) -> BenchConfig:
    """Build the config from BENCH_* variables (unset or empty means the default)."""
    env = os.environ if env is None else env
    get = lambda name: (env.get(name) or "").strip()  # noqa: E731
    values: dict = {}
    for name, key, kind in (
        ("BENCH_SYSTEMS", "systems", _names("BENCH_SYSTEMS", ALL_SYSTEMS)),
        ("BENCH_WORKLOADS", "workloads", _names("BENCH_WORKLOADS", ALL_WORKLOADS)),
        ("BENCH_CONCURRENCY", "concurrency", _ints),
        ("BENCH_CAPACITY_REQUESTS", "capacity_requests", int),
        ("BENCH_CAPACITY_CONCURRENCY", "capacity_concurrency", int),
        ("BENCH_CAPACITY_PROMPT_TOKENS", "capacity_prompt_tokens", _token_range),
        ("BENCH_CAPACITY_MAX_TOKENS", "capacity_max_tokens", int),
        ("BENCH_CAPACITY_KV_TOKENS", "capacity_kv_tokens", int),
        ("BENCH_CAPACITY_MAX_MODEL_LEN", "capacity_max_model_len", int),
        ("BENCH_SLOTS_COMMIT", "slots_commit", str),
        ("BENCH_BEFORE_COMMIT", "before_commit", str),
        ("BENCH_PREFIX_CONCURRENCY", "prefix_concurrency", _ints),
        ("BENCH_PREFIX_REQUESTS", "prefix_requests", int),
        ("BENCH_PREFIX_SYSTEM_TOKENS", "prefix_system_tokens", int),
        ("BENCH_PREFIX_MAX_TOKENS", "prefix_max_tokens", int),
        ("BENCH_REQUESTS_PER_CLIENT", "requests_per_client", int),
        ("BENCH_MIN_REQUESTS", "min_requests", int),
        ("BENCH_REQUESTS", "fixed_requests", int),
        ("BENCH_MAX_TOKENS", "max_tokens", int),
        ("BENCH_PEER_TIMEOUT", "peer_timeout_s", float),
        ("BENCH_HEALTH_TIMEOUT", "health_timeout_s", float),
        ("BENCH_INSTALL_TIMEOUT", "install_timeout_s", float),
        ("BENCH_REQUEST_TIMEOUT", "request_timeout_s", float),
        ("BENCH_WORK_DIR", "work_dir", Path),
        ("BENCH_OUTPUT_MD", "output_md", Path),
        ("BENCH_OUTPUT_JSON", "output_json", Path),
        ("BENCH_VLLM_VERSION", "vllm_version", str),
        ("BENCH_VLLM_CONFIGS", "vllm_configs", _names("BENCH_VLLM_CONFIGS", VLLM_CONFIGS)),
        (
            "BENCH_TRANSFORMERS_CONFIGS",
            "transformers_configs",
            _names("BENCH_TRANSFORMERS_CONFIGS", TRANSFORMERS_CONFIGS),
        ),
        ("BENCH_TRANSFORMERS_VERSION", "transformers_version", str),
        ("BENCH_TORCH_VERSION", "torch_version", str),
    ):
        if get(name):
            values[key] = kind(get(name))
    return BenchConfig(**values)
