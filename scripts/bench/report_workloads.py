"""The capacity and shared-prefix sections of docs/benchmarks.md, and how a run keeps workloads it did not rerun."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import report
from config import BenchConfig
from peer_report import family_of
from plot import plot_levels
from report import LEVEL_COLUMNS, TOK_S, TTFT, SystemResult, failures, level_table, systems_table
from workloads import TITLES


@dataclass
class WorkloadRun:
    """One workload's results in a run: when it ran, what it sent (settings), and each system's result."""

    name: str
    date: str
    settings: dict[str, Any]
    results: list[SystemResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"date": self.date, "settings": self.settings, "systems": [asdict(r) for r in self.results]}


def result_from_dict(raw: dict[str, Any]) -> SystemResult:
    """A SystemResult from its JSON form (unknown keys ignored)."""
    known = {f.name for f in fields(SystemResult)}
    return SystemResult(**{k: v for k, v in raw.items() if k in known})


def carried_over(json_path: Path, names: tuple[str, ...]) -> dict[str, WorkloadRun]:
    """Workloads of the previous report (its JSON) that this run does not rerun, so the page keeps them."""
    try:
        old = json.loads(json_path.read_text())
    except (OSError, ValueError):
        return {}
    stored = dict(old.get("workloads") or {})
    if "standard" not in stored and old.get("systems"):  # a report from before the workloads
        stored["standard"] = {"date": old.get("date", "?"), "settings": {}, "systems": old["systems"]}
    kept = {}
    for name, raw in stored.items():
        if name not in names and name in TITLES:
            kept[name] = WorkloadRun(name, raw["date"], raw["settings"], [result_from_dict(r) for r in raw["systems"]])
    return kept


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _int(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def _prompt_range(level: dict[str, Any]) -> str:
    low, high = level.get("prompt_tokens_min"), level.get("prompt_tokens_max")
    return "n/a" if low is None else f"{low}–{high}"


def capacity_table(results: list[SystemResult]) -> list[str]:
    """Peak sequences running, throughput and TTFT per system."""
    return level_table(
        results,
        [
            *LEVEL_COLUMNS,
            ("Peak running", "---:", lambda lv: _int(lv.get("peak_running"))),
            TOK_S,
            *TTFT,
            ("Prompt tokens", "---:", _prompt_range),
            ("Preemptions", "---:", lambda lv: _int(lv.get("preemptions"))),
            ("Peak from", "---", lambda lv: lv.get("peak_source", "n/a")),
        ],
    )


def prefix_table(results: list[SystemResult]) -> list[str]:
    """TTFT, throughput and prefix-cache hits per system and concurrency."""
    return level_table(
        results,
        [
            *LEVEL_COLUMNS,
            TOK_S,
            *TTFT,
            ("Prefix hit rate", "---:", lambda lv: _pct(lv.get("prefix_hit_rate"))),
            ("Cached tokens (usage)", "---:", lambda lv: _int(lv.get("cached_tokens"))),
        ],
    )


def table_for(workload: str) -> Callable[[list[SystemResult]], list[str]]:
    """The markdown table of a workload's results."""
    tables = {"standard": report.results_table, "capacity": capacity_table, "prefix": prefix_table}
    return tables.get(workload, speculative_table)


def _level(results: list[SystemResult], system: str, concurrency: int | None = None) -> dict[str, Any] | None:
    """The (first, or at ``concurrency``) level of ``system`` (or of a configuration of it), if it ran."""
    for r in results:
        if r.system == system or family_of(r) == system:
            for lv in r.levels:
                if concurrency is None or lv["concurrency"] == concurrency:
                    return lv
    return None


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}×"


def capacity_targets(results: list[SystemResult]) -> list[str]:
    """The capacity targets, paged (ours) against the slot engine (ours-slots), as measured."""
    paged, slots = _level(results, "ours"), _level(results, "ours-slots")
    if not paged or not slots:
        return []
    errors = sum(lv["errors"] for r in results if r.system in ("ours", "ours-slots") for lv in r.levels)
    return [
        f"- Peak running: ours {_int(paged.get('peak_running'))} vs ours-slots {_int(slots.get('peak_running'))}: "
        f"{_ratio(paged.get('peak_running'), slots.get('peak_running'))} (target ≥ 4×).",
        f"- Output tok/s: {_ratio(paged['output_tok_per_s'], slots['output_tok_per_s'])} of ours-slots "
        f"(target ≥ 1.5×); errors (ours and ours-slots): {errors} (target 0).",
    ]


def prefix_targets(results: list[SystemResult]) -> list[str]:
    """Issue 18's shared-prefix targets per concurrency: TTFT p50 with caching vs without, and vs vLLM."""
    lines = []
    for level in next((r.levels for r in results if r.system == "ours"), []):
        c = level["concurrency"]
        off, vllm = _level(results, "ours-nocache", c), _level(results, "vllm", c)
        cached = level["ttft_p50_ms"]
        lines.append(
            f"- c={c}: TTFT p50 with caching is {_ratio(cached, off and off['ttft_p50_ms'])} of ours without "
            f"(target ≤ 0.20×) and {_ratio(cached, vllm and vllm['ttft_p50_ms'])} of vLLM's (target ≤ 1×)."
        )
    return lines


def speculative_table(results: list[SystemResult]) -> list[str]:
    """Throughput and latency per system (speculation on and off) and concurrency."""
    return level_table(results, [*LEVEL_COLUMNS, TOK_S, *TTFT])


def speculative_targets(results: list[SystemResult]) -> list[str]:
    """Output tok/s with SPECULATIVE=ngram against off, at each concurrency (targets: ≥ 1.6× at c=1, ≥ 0.95× at
    c=32)."""
    lines = []
    for level in next((r.levels for r in results if r.system == "ours"), []):
        c = level["concurrency"]
        off = _level(results, "ours-nospec", c)
        target = "≥ 1.6×" if c == 1 else "≥ 0.95×"
        ratio = _ratio(level["output_tok_per_s"], off and off["output_tok_per_s"])
        lines.append(f"- c={c}: output tok/s with ngram speculation is {ratio} of ours without (target {target}).")
    return lines


def _speculative_setup(s: dict[str, Any]) -> list[str]:
    levels = ", ".join(f"c={c} ({n} requests)" for c, n in s["levels"])
    return [
        "- **Load**: streaming chat requests whose answers copy from the prompt (rewrite or fix a note, extract its "
        f"fields, continue or edit code; `COPY_PROMPTS` in `scripts/bench/prompts.py`) at {levels}; "
        f"{s['max_tokens']} new tokens each (`ignore_eos`), greedy.",
        "- **Systems**: ours with `SPECULATIVE=ngram` (k=4, n=3: the defaults) and with `SPECULATIVE=off` "
        "(ours-nospec); greedy text is the same with both (tests/unit/test_speculative_engine.py).",
    ]


def _capacity_setup(s: dict[str, Any]) -> list[str]:
    return [
        f"- **Load**: {s['requests']} streaming chat requests from {s['concurrency']} clients at once, each a "
        f"different user prompt of {s['prompt_tokens'][0]}–{s['prompt_tokens'][1]} tokens (text tokens; the "
        "table's prompt tokens are the server's count with the chat template) built from `scripts/bench/prompts.py`, "
        "each opening differently so the prefix cache cannot help (only the chat template's fixed opening is shared); "
        f"{s['max_tokens']} new tokens each (`ignore_eos`), greedy.",
        f"- **Budget**: ours and ours-slots `MAX_BATCH_TOTAL_TOKENS={s['kv_tokens']}`, "
        f"`MAX_TOTAL_TOKENS={s['max_model_len']}`; vLLM `--kv-cache-memory-bytes` for {s['kv_tokens']} tokens "
        f"(float32), `--max-model-len {s['max_model_len']}`, `--enable-prefix-caching --enable-prompt-tokens-details`.",
        "- **Peak running**: `serve_batch_peak_size` from /metrics after the level where the server has it; "
        "otherwise the largest value of its running gauge (`serve_batch_current_size`, vLLM "
        "`vllm:num_requests_running`) polled every 100 ms during the level.",
    ]


def _prefix_setup(s: dict[str, Any]) -> list[str]:
    return [
        f"- **Load**: one fixed system prompt of {s['system_tokens']} tokens (built from `scripts/bench/prompts.py`) "
        f"before {s['requests']} different short questions, at concurrency {', '.join(map(str, s['concurrency']))}; "
        f"{s['max_tokens']} new tokens each (`ignore_eos`), greedy. The unmeasured warm-up request carries the "
        "same system prompt (so a prefix cache holds it before the first measured request, as on a busy endpoint); "
        "later levels resend the same questions, so the full blocks holding a question's first tokens can hit too.",
        "- **Systems**: ours with `ENABLE_PREFIX_CACHING=true` (ours) and `false` (ours-nocache); vLLM with "
        "`--enable-prefix-caching --enable-prompt-tokens-details`. "
        "Prefix hit rate = growth of the prefix-cache hit counter / growth of the "
        "query counter over the level (`serve_prefix_cache_*_total`, `vllm:prefix_cache_*_total`); cached tokens "
        "= sum of `usage.prompt_tokens_details.cached_tokens` where the server reports it.",
    ]


TARGETS = {"capacity": capacity_targets, "prefix": prefix_targets, "speculative": speculative_targets}
SETUPS = {"capacity": _capacity_setup, "prefix": _prefix_setup, "speculative": _speculative_setup}


def section(run: WorkloadRun) -> list[str]:
    """The markdown section of a capacity or prefix run."""
    targets, setup = TARGETS[run.name], SETUPS[run.name]
    goals = targets(run.results)
    return [
        f"## {TITLES[run.name]}",
        "",
        f"Run on {run.date}, in the same `make bench` session as the table above unless its date differs.",
        "",
        *setup(run.settings),
        "",
        *table_for(run.name)(run.results),
        *(["", "Against the targets:", "", *goals] if goals else []),
        "",
        *systems_table(run.results),
        *failures(run.results, heading=f"Failures and errors ({run.name})"),
        "",
    ]


def _plot(results: list[SystemResult], path: Path, max_tokens: int) -> str:
    """Draw the concurrency-level plot; its file name for the page ('' when none could be drawn)."""
    try:
        drawn = plot_levels(results, path, f"make bench: short prompts, streaming chat, {max_tokens} new tokens each")
    except ImportError as exc:  # matplotlib comes with requirements-test.txt (make bench installs it)
        print(f"no plot: {exc}", flush=True)
        drawn = False
    return path.name if drawn or (results and path.is_file()) else ""


def write_all(runs: dict[str, WorkloadRun], cfg: BenchConfig, info: dict[str, Any]) -> None:
    """Write docs/benchmarks.{md,json,png}: this run's workloads plus those kept from the last report."""
    runs = {**carried_over(cfg.output_json, tuple(runs)), **runs}
    ordered = [runs[name] for name in TITLES if name in runs]
    standard = runs.get("standard")
    results = standard.results if standard else []
    if standard:
        info = {**info, "standard_date": standard.date}
    max_tokens = standard.settings.get("max_tokens", cfg.max_tokens) if standard else cfg.max_tokens
    plot = _plot(results, cfg.output_md.with_suffix(".png"), max_tokens)
    sections = [line for run in ordered if run.name != "standard" for line in section(run)]
    report.write(results, cfg, info, sections, plot, {run.name: run.to_dict() for run in ordered})
