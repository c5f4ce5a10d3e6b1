"""gpu-check's markdown: the one-step profiles, then one summary table (the part printed last)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional


def _load(out: Path, name: str) -> dict[str, Any]:
    path = out / f"{name}.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _f(value: Optional[float], digits: int = 1) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def _bandwidth_rows(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    if "copy" in data:
        rows.append(("a", "device copy bandwidth (read + written)", f"{_f(data['copy']['gb_per_s'])} GB/s"))
    floor = data.get("floor", {})
    for batch, row in floor.get("per_batch", {}).items():
        rows.append(
            (
                "a",
                f"decode floor, batch {batch}, {floor['context']}-token contexts",
                f"{_f(row['floor_ms'], 2)} ms/step ({_f(row['floor_tok_per_s'], 0)} tok/s; "
                f"{row['bytes'] / 1e9:.2f} GB read)",
            )
        )
    return rows


def _tests_rows(out: Path) -> list[tuple[str, str, str]]:
    log = out / "tests.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|errors?|deselected)\b.*?)\s*=*$", text, re.MULTILINE)
    rows = [("b", "tests/gpu", summary[-1] if summary else "no pytest summary (see tests.log)")]
    div = _load(out, "divergence")
    if div:
        rows.append(
            (
                "b",
                f"8B bf16 vs HF, {div['requests']} requests × {div['tokens']} tokens",
                f"first token agrees {div['first_token_agreement']:.0%}, "
                f"all tokens {div['all_tokens_agree']:.0%}, "
                f"mean matched prefix {div['mean_matched_prefix']:.1f}; HF rank of the engine's token where "
                f"it diverged: {div.get('hf_rank_of_engine_token_at_divergence')}",
            )
        )
    return rows


def _engine_rows(data: dict[str, Any], floor: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for key, row in data.items():
        if not key.startswith("batch_") or row.get("ms_per_step") is None:
            continue
        floor_ms = floor.get("per_batch", {}).get(str(row["batch"]), {}).get("floor_ms")
        share = f", {floor_ms / row['ms_per_step']:.0%} of the floor" if floor_ms else ""
        inside = row.get("step_method_ms_p50")
        inside = f"; inside the step method p50 {_f(inside, 2)} ms" if inside is not None else ""
        rows.append(
            (
                "c",
                f"engine decode step, batch {row['batch']}",
                f"{_f(row['ms_per_step'], 2)} ms ({_f(row['tok_per_s'], 0)} tok/s{share}{inside})",
            )
        )
        at_once = data.get(f"read_each_step_{row['batch']}", {}).get("ms_per_step")
        if at_once:
            saved = 1 - row["ms_per_step"] / at_once
            rows.append(
                (
                    "c",
                    f"engine decode step, batch {row['batch']}, each step read before the next is planned",
                    f"{_f(at_once, 2)} ms (working ahead: {_f(row['ms_per_step'], 2)} ms, {saved:.0%} less)",
                )
            )
        prompts = row.get("prompt_steps_ms")
        if prompts:
            steps = ", ".join(_f(ms, 2) for ms in prompts)
            rows.append(("c", f"engine prompt steps (eager), batch {row['batch']}", f"{steps} ms"))
    return rows


def _compile_rows(data: dict[str, Any], engine: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    for key in ("cold", "warm"):
        start = data.get(key)
        if start:
            report = start.get("report") or {}
            state = "compiled" if report.get("enabled") else f"NOT compiled: {report.get('reason')}"
            rows.append(
                (
                    "c",
                    f"COMPILE start-up, {key} inductor cache",
                    f"ready in {_f(start['ready_s'])} s, compile + self-check {_f(report.get('seconds'))} s ({state})",
                )
            )
    for key, row in data.items():
        if key.startswith("batch_") and row.get("ms_per_step") is not None:
            eager = engine.get(key, {}).get("ms_per_step")
            versus = f" (engine stage without COMPILE: {_f(eager, 2)} ms)" if eager else ""
            rows.append(("c", f"COMPILE decode step, batch {row['batch']}", f"{_f(row['ms_per_step'], 2)} ms{versus}"))
    return rows


def _server_rows(data: dict[str, Any], floor: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    if "cold_start_s" in data:
        rows.append(("d", "server cold start (process start → /ping 200)", f"{_f(data['cold_start_s'])} s"))
    floor_1 = floor.get("per_batch", {}).get("1", {}).get("floor_tok_per_s")
    for key, level in data.items():
        if not key.startswith("c_"):
            continue
        if "skipped" in level:
            rows.append(("d", f"server c={key.rpartition('_')[2]}", level["skipped"]))
            continue
        share = f" ({level['output_tok_per_s'] / floor_1:.0%} of the b=1 floor)" if key == "c_1" and floor_1 else ""
        rows.append(
            (
                "d",
                f"server c={level['concurrency']} ({level['requests']} requests, {level['errors']} errors)",
                f"{_f(level['output_tok_per_s'])} tok/s{share}; TTFT p50/p95 {_f(level['ttft_p50_ms'])}/"
                f"{_f(level['ttft_p95_ms'])} ms; "
                f"ITL p50/p95 {_f(level.get('itl_p50_ms'))}/{_f(level.get('itl_p95_ms'))} ms",
            )
        )
    if data.get("peak_gpu_memory_mib") is not None:
        rows.append(("d", "peak GPU memory (device-wide, nvidia-smi)", f"{data['peak_gpu_memory_mib']:,} MiB"))
    return rows


def _hf_rows(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    setup = data.get("setup", {})
    label = "static cache" + (" + compile" if setup.get("compile") else ", no compile (CPU)")
    rows = []
    for key, row in data.items():
        if key.startswith("batch_"):
            value = f"first call {_f(row['first_call_s'])} s"
            if "tok_per_s" in row:
                value = f"{_f(row['tok_per_s'], 0)} tok/s ({_f(row['ms_per_step'], 2)} ms/step); " + value
            rows.append(("e", f"HF generate, {label}, batch {row['batch']}", value))
    return rows


def _tensor_parallel_rows(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    if "skipped" in data:
        return [("f", "tensor parallelism", data["skipped"])]
    ranks, outputs = data.get("ranks"), data.get("outputs")
    rows = []
    if outputs:
        rows.append(
            ("f", f"TP={ranks} greedy tokens equal to TP=1", f"{outputs['equal_tokens']} of {outputs['tokens']}")
        )
    for key, row in data.get(f"tp{ranks}", {}).items():
        one = data.get("tp1", {}).get(key, {})
        if key.startswith("batch_") and row.get("ms_per_step"):
            value = f"{_f(row['ms_per_step'], 2)} ms/step (TP=1: {_f(one.get('ms_per_step'), 2)})"
            rows.append(("f", f"TP={ranks} decode step, {key.replace('_', ' ')}", value))
    return rows


def _verify_rows(data: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Each batch's plain step, and per k the verify step's cost and the speedup at acceptance 0.7."""
    rows = []
    for key, row in data.items():
        if not key.startswith("batch_"):
            continue
        batch = key.replace("_", " ")
        rows.append(
            ("g", f"plain decode step, {batch}", f"{_f(row['plain_ms'], 2)} ms (eager {_f(row['plain_eager_ms'], 2)})")
        )
        for k, verify in row["verify"].items():
            cost, gain = verify["cost_in_plain_steps"], verify["speedup"]["a=0.7"]
            value = f"{_f(verify['ms'], 2)} ms = {cost} plain steps; x{gain} at a=0.7"
            rows.append(("g", f"verify step {k}, {batch}", value))
    return rows


WORKLOAD_HEADER = [
    "| workload | prompt | c | tok/s | step p50 ms | read/step | floor ms | of floor | TTFT p50 ms | "
    "prefix hits | steps graph / fixed eager / other |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
]


def _bytes(count: float) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.2f} MB"


def _workload_cell(key: str, row: dict[str, Any]) -> str:
    """One row of the workloads table (a skipped cell says why)."""
    label, _, batch = key.rpartition("_c")
    if "skipped" in row:
        return f"| {label} | | {batch} | {row['skipped']} | | | | | | | |"
    steps = row.get("steps", {})
    paths = f"{steps.get('graph')} / {steps.get('fixed_shape_eager')} / {steps.get('other_eager')}"
    share = f"{row['floor_share']:.0%}" if row.get("floor_share") else "—"
    return (
        f"| {row.get('workload', label)} | {row['context']:,} | {row['batch']} | {_f(row['tok_per_s'], 0)} | "
        f"{_f(row['step_method_ms_p50'], 2)} | {_bytes(row['bytes_per_step'])} | {_f(row['floor_ms'], 2)} | "
        f"{share} | {_f(row['first_token_ms_p50'])} | {row['prefix_hit_tokens']:,} | {paths} |"
    )


def _cell_order(key: str) -> tuple[int, int, int]:
    """greedy, sampled, shared prefix; then by prompt length, then concurrency ("greedy_ctx256_c32")."""
    label, _, batch = key.rpartition("_c")
    workload, _, context = label.partition("_ctx")
    rank = ("greedy", "sampled").index(workload) if workload in ("greedy", "sampled") else 2
    return rank, int(context or 0), int(batch)


def _workload_notes(data: dict[str, Any]) -> list[str]:
    """The prompts' prefill per length, the shared prefix's first request, the graphs the cells could replay."""
    notes = []
    for key, row in data.items():
        if key.startswith("prefill_"):
            rate = row["tokens"] / row["seconds"] if row["seconds"] else None
            notes.append(
                f"- {key.replace('_', ' ')}: {row['requests']} requests, {row['tokens']:,} tokens in "
                f"{_f(row['seconds'], 2)} s ({_f(rate, 0)} tok/s, {row['prefix_hit_tokens']:,} already cached)"
            )
        elif key.startswith("shared_prefix") and "first_request_ttft_ms" in row:
            notes.append(
                f"- shared prefix of {row['prefix_tokens']:,} tokens (+ {row['tail_tokens']} distinct): the first "
                f"request's TTFT {_f(row['first_request_ttft_ms'])} ms (prefix cold), the others' p50 "
                f"{_f(row['first_token_ms_p50'])} ms"
            )
    graphs = data.get("setup", {}).get("graphs")
    if graphs:
        notes.append(f"- CUDA graphs: {graphs['shapes']} decode shapes captured ({graphs['reason'] or 'on'})")
    return notes


def workloads_table(data: dict[str, Any]) -> list[str]:
    """What users send (workloads_stage.py): one row per cell, then the notes; nothing when it did not run."""
    keys = sorted((key for key in data if key.rpartition("_c")[2].isdigit()), key=_cell_order)
    cells = [_workload_cell(key, data[key]) for key in keys]
    if not cells:
        return []
    title = "What users send: decode steps timed with every request decoding (prompts prefilled before, apart)"
    return [f"**{title}**", "", *WORKLOAD_HEADER, *cells, "", *_workload_notes(data), ""]


def markdown(out: Path, results: dict[str, Any]) -> str:
    """The whole report: header, profiles, stage statuses, then the summary table last."""
    bandwidth, engine = _load(out, "bandwidth"), _load(out, "engine")
    floor = bandwidth.get("floor", {})
    plan = results["plan"]
    lines = [
        f"# gpu-check, {results['date']}",
        "",
        f"**Device:** {results['device']}",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}. "
        f"Shape `{plan['shape']}` (dummy weights, {plan['dtype']}); prompts {plan['prompt_tokens']} tokens, "
        f"{plan['new_tokens']} new tokens (ignore_eos).",
        "",
    ]
    for key, row in [*engine.items(), *_load(out, "compile").items()]:
        for table in (row.get("profile"), row.get("profile_outside")) if isinstance(row, dict) else ():
            if table:
                lines += ["```", table.rstrip(), "```", ""]
    lines += workloads_table(_load(out, "workloads"))
    lines += ["| stage | status | seconds |", "|---|---|---|"]
    for name, stage in results["stages"].items():
        lines.append(f"| {name} | {stage.get('status', '')[:300]} | {stage.get('seconds', '')} |")
    rows = _bandwidth_rows(bandwidth) + _tests_rows(out) + _engine_rows(engine, floor)
    rows += _compile_rows(_load(out, "compile"), engine)
    rows += _server_rows(_load(out, "server"), floor) + _hf_rows(_load(out, "hf"))
    rows += _tensor_parallel_rows(_load(out, "tensor_parallel")) + _verify_rows(_load(out, "verify"))
    lines += ["", "| | measure | value |", "|---|---|---|"] + [f"| {s} | {m} | {v} |" for s, m, v in rows]
    if not results["gpu"]:
        lines += ["", f"**{results['device']}.**"]
    return "\n".join(lines) + "\n"
