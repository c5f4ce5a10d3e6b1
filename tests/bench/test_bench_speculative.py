"""The speculative workload of `make bench`: its prompts copy from themselves, it runs ours with SPECULATIVE=ngram
and off, and its section reports the speed-up against the targets. No server is started."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))

import config  # noqa: E402
import prompts  # noqa: E402
import report_workloads as rw  # noqa: E402
import systems  # noqa: E402
import workloads  # noqa: E402
from report import SystemResult  # noqa: E402


def test_the_workload_runs_ours_with_and_without_ngram_at_c1_and_c32():
    cfg = config.from_env({"BENCH_WORKLOADS": "speculative", "BENCH_SYSTEMS": "ours,ours-nospec"})
    workload = workloads.build("speculative", cfg, Path("/nonexistent"))
    assert workloads.systems_for("speculative", cfg) == ("ours-nospec", "ours")
    assert [c for c, _ in workload.levels] == [1, 32]
    assert workload.ours_env == {"SPECULATIVE": "ngram"}
    assert "ours-nospec" in systems.RUNNERS
    assert workload.prompts == prompts.COPY_PROMPTS


def test_every_prompt_holds_the_text_its_answer_copies():
    for prompt in prompts.COPY_PROMPTS:
        assert prompts.NOTE[-60:] in prompt or prompts.CODE[:60] in prompt


def level(concurrency: int, tok_s: float) -> dict:
    return {
        "concurrency": concurrency,
        "requests": 8,
        "errors": 0,
        "output_tok_per_s": tok_s,
        "ttft_p50_ms": 5.0,
        "ttft_p95_ms": 9.0,
        "latency_p50_ms": 1.0,
    }


def test_the_section_gives_the_speed_up_of_ngram_over_off_at_each_level():
    results = [
        SystemResult("ours-nospec", status="ok", levels=[level(1, 10.0), level(32, 100.0)]),
        SystemResult("ours", status="ok", levels=[level(1, 17.0), level(32, 96.0)]),
    ]
    assert rw.speculative_targets(results) == [
        "- c=1: output tok/s with ngram speculation is 1.70× of ours without (target ≥ 1.6×).",
        "- c=32: output tok/s with ngram speculation is 0.96× of ours without (target ≥ 0.95×).",
    ]
    run = rw.WorkloadRun("speculative", "today", {"levels": [[1, 8], [32, 64]], "max_tokens": 128}, results)
    text = "\n".join(rw.section(run))
    assert "## Speculative decoding: answers that copy from the prompt" in text and "c=1 (8 requests)" in text
