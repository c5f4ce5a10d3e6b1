"""Benchmark settings, read once from BENCH_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ALL_SYSTEMS = ("ours", "vllm", "transformers", "offline")
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
    torch_version: str = ""  # "": the project venv's version (its local CPU wheel)

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


def _systems(raw: str) -> tuple[str, ...]:
    """Parse "ours,vllm" and reject unknown names."""
    names = tuple(part.strip().lower() for part in raw.split(",") if part.strip())
    unknown = [name for name in names if name not in ALL_SYSTEMS]
    if unknown or not names:
        raise ValueError(f"BENCH_SYSTEMS: unknown {unknown or raw!r}; choose from {', '.join(ALL_SYSTEMS)}")
    return names


def from_env(env: Mapping[str, str] | None = None) -> BenchConfig:
    """Build the config from BENCH_* variables (unset or empty means the default)."""
    env = os.environ if env is None else env
    get = lambda name: (env.get(name) or "").strip()  # noqa: E731
    values: dict = {}
    if get("BENCH_SYSTEMS"):
        values["systems"] = _systems(get("BENCH_SYSTEMS"))
    if get("BENCH_CONCURRENCY"):
        values["concurrency"] = _ints(get("BENCH_CONCURRENCY"))
    for name, key, kind in (
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
        ("BENCH_TRANSFORMERS_VERSION", "transformers_version", str),
        ("BENCH_TORCH_VERSION", "torch_version", str),
    ):
        if get(name):
            values[key] = kind(get(name))
    return BenchConfig(**values)
