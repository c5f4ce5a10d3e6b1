"""Ours against each peer's best row at each concurrency: every configuration of a peer is a row of its own."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

PEER_NAMES = {"vllm": "vLLM", "transformers": "transformers"}


def family_of(result: Any) -> str:
    """The system a row belongs to ("vllm" for every vLLM configuration); its name when it has no family."""
    return getattr(result, "family", "") or result.system


def best_levels(results: Iterable[Any], family: str) -> dict[int, tuple[str, dict[str, Any]]]:
    """Per concurrency: the row of ``family`` with the most output tok/s, and its level (levels with errors
    are left out)."""
    best: dict[int, tuple[str, dict[str, Any]]] = {}
    for result in results:
        if family_of(result) != family:
            continue
        for level in result.levels:
            concurrency = level["concurrency"]
            if level["errors"]:
                continue
            if concurrency not in best or level["output_tok_per_s"] > best[concurrency][1]["output_tok_per_s"]:
                best[concurrency] = (result.system, level)
    return best


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}×" if theirs else "n/a"


def ratio_table(results: list[Any], ours: str = "ours") -> list[str]:
    """A table per concurrency of our output tok/s, each peer's best row and ours ÷ it ([] without both sides)."""
    mine = best_levels(results, ours)
    peers = [(family, best_levels(results, family)) for family in PEER_NAMES]
    peers = [(family, best) for family, best in peers if best]
    if not mine or not peers:
        return []
    header = ["Concurrency", f"{ours} tok/s"]
    for family, _ in peers:
        name = PEER_NAMES[family]
        header += [f"{name}: best row", f"{name} tok/s", f"{ours} ÷ {name}"]
    rows = ["| " + " | ".join(header) + " |", "| ---: | ---: |" + " --- | ---: | ---: |" * len(peers)]
    for concurrency in sorted(mine):
        tok_s = mine[concurrency][1]["output_tok_per_s"]
        cells = [str(concurrency), f"{tok_s:,.1f}"]
        for _, best in peers:
            if concurrency in best:
                row, level = best[concurrency]
                cells += [row, f"{level['output_tok_per_s']:,.1f}", _ratio(tok_s, level["output_tok_per_s"])]
            else:
                cells += ["–", "n/a", "n/a"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def ratio_section(results: list[Any]) -> list[str]:
    """The ratio table with its one-line explanation, or nothing."""
    table = ratio_table(results)
    if not table:
        return []
    return [
        "",
        "Ours against each peer's best row at each concurrency (every configuration of a peer is a row above; "
        "levels with errors are left out):",
        "",
        *table,
    ]


def _setting(config: dict[str, Any]) -> str:
    """A configuration's env in words."""
    parts = [f"`{key}={value}`" for key, value in config.get("env", {}).items()]
    return ", ".join(parts) or "nothing set"


def configuration_lines(results: Iterable[Any]) -> list[str]:
    """A bullet per peer configuration: what it set (env, LD_PRELOAD) and how vLLM bound its threads."""
    lines = []
    for result in results:
        config = getattr(result, "config", None) or {}
        if not config:
            continue
        binding = (
            "; vLLM's log: " + ", ".join(f"`{line}`" for line in config["binding"]) if config.get("binding") else ""
        )
        what = f" ({config['what']})" if config.get("what") else ""
        lines.append(f"  - `{result.system}`{what}: {_setting(config)}{binding}.")
    if not lines:
        return []
    return [
        "- **Peer configurations** (each its own row; `BENCH_VLLM_CONFIGS`, `BENCH_TRANSFORMERS_CONFIGS`): each "
        "starts from this environment with the settings it controls removed, then sets its own:",
        *lines,
    ]
