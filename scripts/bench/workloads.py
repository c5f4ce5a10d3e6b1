"""The benchmark's workloads: what each sends, at which concurrency levels, to which systems, with which settings.

- standard: the short prompts of prompts.py at BENCH_CONCURRENCY (the c=1/8/32 table), every system.
- capacity: many concurrent 200–600-token prompts through a fixed KV budget; peak sequences running at once.
- prefix: one long shared system prompt under different short questions; TTFT with and without prefix caching.
- speculative: answers that copy from the prompt (rewrite, fix, extract, continue code) at c=1 and c=32, ours with
  SPECULATIVE=ngram against ours with it off (ours-nospec).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config import BenchConfig
from load import Prompt
from prompts import COPY_PROMPTS, PROMPTS, TokenCounter, capacity_prompts, shared_system_prompt, with_system

# The systems each workload runs (in this order), before BENCH_SYSTEMS filters them.
WORKLOAD_SYSTEMS: dict[str, tuple[str, ...]] = {
    "standard": ("ours", "ours-before", "vllm", "transformers", "offline"),
    "capacity": ("ours", "ours-before", "ours-slots", "vllm"),  # ours-before: "no worse than before", same run
    "prefix": ("ours", "ours-before", "ours-nocache", "vllm"),
    "speculative": ("ours-nospec", "ours"),
}
TITLES = {
    "standard": "Concurrency levels",
    "capacity": "Capacity: concurrent sequences in a fixed KV budget",
    "prefix": "Shared prefix: one long system prompt, different questions",
    "speculative": "Speculative decoding: answers that copy from the prompt",
}
SPECULATIVE_LEVELS = ((1, 8), (32, 64))  # (concurrency, requests)
SPECULATIVE_MAX_TOKENS = 128


@dataclass(frozen=True)
class Workload:
    """One workload: its prompts, levels ((concurrency, requests) pairs), and the servers' settings for it."""

    name: str
    prompts: list[Prompt]
    levels: tuple[tuple[int, int], ...]
    max_tokens: int
    warmup: Prompt
    max_model_len: int
    ours_env: dict[str, str] = field(default_factory=dict)  # on top of ours_spec's
    kv_tokens: int | None = None  # the KV pool in tokens (ours: MAX_BATCH_TOTAL_TOKENS; vLLM: bytes for it)
    server_metrics: bool = False  # scrape /metrics around each level and poll it during
    settings: dict[str, Any] = field(default_factory=dict)  # what the report says about it

    @property
    def title(self) -> str:
        return TITLES[self.name]


def systems_for(workload: str, cfg: BenchConfig) -> tuple[str, ...]:
    """The systems a workload runs in this run: its own list, kept to those BENCH_SYSTEMS names."""
    return tuple(name for name in WORKLOAD_SYSTEMS[workload] if name in cfg.systems)


def token_counter(model_dir: Path) -> TokenCounter:
    """Counts tokens of a text with the model's own tokenizer (tokenizer.json; no special tokens)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def standard(cfg: BenchConfig) -> Workload:
    """The c=1/8/32 table: short prompts, every system."""
    return Workload(
        name="standard",
        prompts=list(PROMPTS),
        levels=tuple((c, cfg.requests_at(c)) for c in cfg.concurrency),
        max_tokens=cfg.max_tokens,
        warmup=PROMPTS[-1],
        max_model_len=cfg.max_model_len,
        settings={"levels": [[c, cfg.requests_at(c)] for c in cfg.concurrency], "max_tokens": cfg.max_tokens},
    )


def capacity(cfg: BenchConfig, count_tokens: TokenCounter) -> Workload:
    """Different long-ish prompts, all at once, through a KV pool of ``capacity_kv_tokens`` tokens."""
    low, high = cfg.capacity_prompt_tokens
    return Workload(
        name="capacity",
        prompts=capacity_prompts(cfg.capacity_requests, low, high, count_tokens),
        levels=((cfg.capacity_concurrency, cfg.capacity_requests),),
        max_tokens=cfg.capacity_max_tokens,
        warmup=PROMPTS[-1],
        max_model_len=cfg.capacity_max_model_len,
        ours_env={
            "MAX_BATCH_TOTAL_TOKENS": str(cfg.capacity_kv_tokens),
            "MAX_TOTAL_TOKENS": str(cfg.capacity_max_model_len),
        },
        kv_tokens=cfg.capacity_kv_tokens,
        server_metrics=True,
        settings={
            "requests": cfg.capacity_requests,
            "concurrency": cfg.capacity_concurrency,
            "prompt_tokens": [low, high],
            "max_tokens": cfg.capacity_max_tokens,
            "kv_tokens": cfg.capacity_kv_tokens,
            "max_model_len": cfg.capacity_max_model_len,
        },
    )


def shared_prefix(cfg: BenchConfig, count_tokens: TokenCounter) -> Workload:
    """The same long system prompt before each question; the warm-up puts it in the prefix cache."""
    system = shared_system_prompt(cfg.prefix_system_tokens, count_tokens)
    questions = [PROMPTS[i % len(PROMPTS)] for i in range(cfg.prefix_requests)]
    return Workload(
        name="prefix",
        prompts=with_system(system, questions),
        levels=tuple((c, cfg.prefix_requests) for c in cfg.prefix_concurrency),
        max_tokens=cfg.prefix_max_tokens,
        warmup=with_system(system, ["Say hello to the student."])[0],
        max_model_len=cfg.max_model_len,
        server_metrics=True,
        settings={
            "system_tokens": count_tokens(system),
            "requests": cfg.prefix_requests,
            "concurrency": list(cfg.prefix_concurrency),
            "max_tokens": cfg.prefix_max_tokens,
        },
    )


def speculative(cfg: BenchConfig) -> Workload:
    """Answers that copy from the prompt, with SPECULATIVE=ngram (ours) and off (ours-nospec)."""
    return Workload(
        name="speculative",
        prompts=list(COPY_PROMPTS),
        levels=SPECULATIVE_LEVELS,
        max_tokens=SPECULATIVE_MAX_TOKENS,
        warmup=PROMPTS[-1],
        max_model_len=cfg.max_model_len,
        ours_env={"SPECULATIVE": "ngram"},
        server_metrics=True,
        settings={"levels": [list(level) for level in SPECULATIVE_LEVELS], "max_tokens": SPECULATIVE_MAX_TOKENS},
    )


def build(name: str, cfg: BenchConfig, model_dir: Path) -> Workload:
    """The named workload, its prompts built with the model's tokenizer."""
    if name == "standard":
        return standard(cfg)
    if name == "speculative":
        return speculative(cfg)
    builder = {"capacity": capacity, "prefix": shared_prefix}[name]
    return builder(cfg, token_counter(model_dir))
