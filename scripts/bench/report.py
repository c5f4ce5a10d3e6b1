"""The results of one run: per-system records, the machine description, and the markdown/JSON writers."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from config import BenchConfig
from peer_report import configuration_lines, ratio_section


@dataclass
class SystemResult:
    """What happened to one system: its status, timings, per-level figures and notes."""

    system: str  # the row's name: a peer's configuration names what it sets
    description: str = ""
    status: str = "not run"  # ok | errors | timed out | install failed | failed
    reason: str | None = None
    version: str = "?"
    install_s: float | None = None
    install_cached: bool = False  # installed by an earlier run; install_s is that run's time
    cold_start_s: float | None = None
    levels: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    sample: str = ""  # the warm-up answer, to see that the model says something sensible
    family: str = ""  # the system a configuration row belongs to (vllm, transformers); "" for the others
    config: dict[str, Any] = field(default_factory=dict)  # a peer configuration's key, env, args, binding


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vp2intersect", "amx_bf16")  # what moves our CPU figures


def cpu_identity(cpuinfo: str) -> str:
    """The CPU's name, family and model, and the flags that change our figures (hosts of two generations can both be
    "AMD EPYC" to a VM, with different step times)."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    shown = ", ".join(flag for flag in SPEED_FLAGS if flag in flags) or "none of " + ", ".join(SPEED_FLAGS)
    family = f"family {fields['cpu family']} model {fields.get('model', '?')}" if "cpu family" in fields else ""
    return f"{fields.get('model name', '?')} ({'; '.join(part for part in (family, shown) if part)})"


def machine() -> dict[str, Any]:
    """This machine in a few facts: CPUs (nproc), CPU model, RAM, OS and Python."""
    model, mem_kib = "?", 0
    try:
        model = cpu_identity(Path("/proc/cpuinfo").read_text())
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or str(os.cpu_count())
    return {
        "nproc": int(nproc),
        "cpu_model": model,
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "gpu": "none",
    }


def cpu_busy(seconds: float = 3.0) -> float:
    """The fraction (0..1) of all CPUs busy over the next ``seconds``, from /proc/stat."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, 1 - (idle1 - idle0) / max(total1 - total0, 1))


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


Cell = Callable[[dict[str, Any]], str]
# (header, alignment, cell of one level): the columns every level table starts with
LEVEL_COLUMNS: list[tuple[str, str, Cell]] = [
    ("Concurrency", "---:", lambda lv: str(lv["concurrency"])),
    ("Requests", "---:", lambda lv: str(lv["requests"])),
    ("Errors", "---:", lambda lv: str(lv["errors"])),
]
TOK_S: tuple[str, str, Cell] = ("Output tok/s", "---:", lambda lv: _fmt(lv["output_tok_per_s"]))
TTFT: list[tuple[str, str, Cell]] = [
    ("TTFT p50 (ms)", "---:", lambda lv: _fmt(lv["ttft_p50_ms"], 0)),
    ("TTFT p95 (ms)", "---:", lambda lv: _fmt(lv["ttft_p95_ms"], 0)),
]


def level_table(results: list[SystemResult], columns: list[tuple[str, str, Cell]]) -> list[str]:
    """One row per system and level: the system, then ``columns``; a system without levels gets one row with its
    status in the fourth column."""
    rows = [
        "| System | " + " | ".join(header for header, _, _ in columns) + " |",
        "| --- | " + " | ".join(align for _, align, _ in columns) + " |",
    ]
    for result in results:
        if not result.levels:
            cells = ["–"] * len(columns)
            why = f": {result.reason.splitlines()[0]}" if result.status == "not set up" and result.reason else ""
            cells[min(3, len(cells) - 1)] = f"**{result.status}**{why.replace('|', '/')}"
            rows.append(f"| {result.system} | " + " | ".join(cells) + " |")
        for level in result.levels:
            rows.append(f"| {result.system} | " + " | ".join(cell(level) for _, _, cell in columns) + " |")
    return rows


def results_table(results: list[SystemResult]) -> list[str]:
    """One row per system and concurrency level; failed systems get one row saying so."""
    latency = ("Latency p50 (ms)", "---:", lambda lv: _fmt(lv["latency_p50_ms"], 0))
    return level_table(results, [*LEVEL_COLUMNS, TOK_S, *TTFT, latency])


def systems_table(results: list[SystemResult]) -> list[str]:
    """Status, version, install and cold-start times, and notes of each system."""
    rows = [
        "| System | What ran | Status | Version | Install (s) | Cold start (s) | Notes |",
        "| --- | --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in results:
        notes = "; ".join(r.notes).replace("|", "\\|") or ""
        install = "–" if r.install_s is None and not r.install_cached else _fmt(r.install_s, 0)
        install += " (earlier run)" if r.install_cached else ""
        cold = _fmt(r.cold_start_s)
        rows.append(f"| {r.system} | {r.description} | {r.status} | {r.version} | {install} | {cold} | {notes} |")
    return rows


def failures(results: list[SystemResult], heading: str = "Failures and errors") -> list[str]:
    """A section per system that failed or saw errors, with the reason (often a log tail)."""
    lines: list[str] = []
    for r in results:
        errors = [lvl["first_error"] for lvl in r.levels if lvl.get("first_error")]
        if r.reason or errors:
            lines += ["", f"### {r.system}: {r.status}", "", "```", (r.reason or errors[0]).strip()[-3000:], "```"]
    return (["", f"## {heading}"] + lines) if lines else []


def setup(cfg: BenchConfig, info: dict[str, Any], results: list[SystemResult] = ()) -> list[str]:
    """The bullet list that says what ran where, and how it was measured."""
    m = info["machine"]
    levels = ", ".join(f"{c} ({cfg.requests_at(c)} requests)" for c in cfg.concurrency)
    return [
        f"- **Machine**: {m['nproc']} CPUs (`nproc`), {m['cpu_model']}, {m['ram_gib']} GiB RAM, no GPU; "
        f"{m['os']}, Python {m['python']}. Each system's notes say how busy the CPUs were just before it "
        "started: other work on the machine skews every figure.",
        f"- **Model**: {info['model']}, float32 everywhere, max model length {cfg.max_model_len}. "
        f"vLLM, transformers serve and offline load `{info['model_dir']}`: our loader's folder with the tied "
        "embedding stored as `model.embed_tokens.weight` and `architectures` set (see `scripts/bench/model_dir.py`).",
        f"- **Load**: streaming `/v1/chat/completions`, {info['n_prompts']} different short user prompts "
        f"(in order, cycled), `max_tokens` {cfg.max_tokens}, `temperature` 0, `ignore_eos` (or its equivalent) "
        f"so that each request makes {cfg.max_tokens} tokens, `stream_options.include_usage`; "
        "one unmeasured warm-up request per server first.",
        f"- **Concurrency levels** (clients in parallel): {levels}.",
        "- **Figures**: output tok/s = output tokens of the level / its wall time; TTFT = request sent → first "
        "non-empty content delta; latency = request sent → end of its stream; cold start = process start → "
        "first 200 from the health check (offline: model load time).",
        f"- **Bounds**: {cfg.peer_timeout_s:.0f} s per system (start, warm-up and all levels), "
        f"{cfg.health_timeout_s:.0f} s to become healthy; each server is stopped by its process group.",
        *configuration_lines(results),
    ]


def markdown(
    results: list[SystemResult], cfg: BenchConfig, info: dict[str, Any], sections: list[str] = (), plot: str = ""
) -> str:
    """The whole docs/benchmarks.md page: the concurrency-level table (and ``plot``), then ``sections``."""
    standard_date = info.get("standard_date", info["date"])
    kept = (
        f"The concurrency-level table is from the run of {standard_date} (not rerun this time)."
        if standard_date != info["date"]
        else ""
    )
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `make bench` (`scripts/bench/run.py`) on {info['date']}: every system ran in one session, "
        "one after the other, on the same machine with the same model.",
        "",
        "## Setup",
        "",
        *setup(cfg, info, results),
        "",
        "## Results",
        "",
        *([kept, ""] if kept else []),
        *results_table(results),
        *ratio_section(results),
        *(["", f"![output tok/s and TTFT p50 against concurrency]({plot})"] if plot else []),
        "",
        "## Systems",
        "",
        *systems_table(results),
        *failures(results),
        "",
        *sections,
        *reproduce(cfg),
    ]
    return "\n".join(lines)


def reproduce(cfg: BenchConfig) -> list[str]:
    """The page's closing section: the commands that rerun it, and the knobs."""
    systems, levels = ",".join(cfg.systems), ",".join(map(str, cfg.concurrency))
    return [
        "## Reproduce",
        "",
        "```",
        "make bench",
        f"BENCH_SYSTEMS={systems} BENCH_CONCURRENCY={levels} make bench",
        "BENCH_WORKLOADS=capacity make bench   # one workload; the page keeps the others from the last run",
        "BENCH_SYSTEMS=ours,vllm BENCH_VLLM_CONFIGS=all-cores make bench   # vLLM in one configuration only",
        "```",
        "",
        "Workloads: `BENCH_WORKLOADS` (standard,capacity,prefix). Systems: `BENCH_SYSTEMS` (ours, vllm (each of its "
        "configurations), "
        "transformers, offline, ours-slots, ours-nocache, ours-before; each workload runs those of its own it names). "
        "Other knobs: "
        "`BENCH_REQUESTS` (fixed requests per level), `BENCH_MAX_TOKENS`, `BENCH_CAPACITY_*` and `BENCH_PREFIX_*` "
        "(see `scripts/bench/config.py`), `BENCH_VLLM_CONFIGS` (default,default-preload,all-cores,all-cores-preload: "
        "which vLLM rows run), `BENCH_TRANSFORMERS_CONFIGS` (default,one-core-free), "
        "`BENCH_SLOTS_COMMIT`, `BENCH_BEFORE_COMMIT`, `BENCH_PEER_TIMEOUT`, "
        "`BENCH_HEALTH_TIMEOUT`, `BENCH_INSTALL_TIMEOUT`, `BENCH_VLLM_VERSION`, `BENCH_TRANSFORMERS_VERSION`, "
        "`BENCH_WORK_DIR` (virtualenvs, model copy and logs; default `~/.cache/sagemaker-llm-serve/bench`).",
        "",
    ]


KEPT_MARKER = "<!-- make bench keeps everything below this line -->"


def write(
    results: list[SystemResult],
    cfg: BenchConfig,
    info: dict[str, Any],
    sections: list[str] = (),
    plot: str = "",
    workloads: dict[str, Any] | None = None,
) -> None:
    """Overwrite the markdown page (keeping any sections below KEPT_MARKER) and the raw JSON."""
    cfg.output_md.parent.mkdir(parents=True, exist_ok=True)
    old = cfg.output_md.read_text() if cfg.output_md.is_file() else ""
    kept = old[old.index(KEPT_MARKER) :] if KEPT_MARKER in old else ""
    cfg.output_md.write_text(markdown(results, cfg, info, sections, plot) + ("\n" + kept if kept else ""))
    raw = {
        **info,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "systems": [asdict(r) for r in results],
        "workloads": workloads or {},
    }
    cfg.output_json.write_text(json.dumps(raw, indent=2) + "\n")


def today() -> str:
    return time.strftime("%Y-%m-%d %H:%M %Z")
