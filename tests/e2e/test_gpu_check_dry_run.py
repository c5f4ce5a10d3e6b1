"""`make gpu-check` without a GPU: every stage runs on tiny shapes on the CPU and the report says there is no GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def test_gpu_check_dry_run_on_cpu(tmp_path):
    out = tmp_path / "gpu-check"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu" / "check.py"), str(out), "--cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=560,
    )
    results = json.loads((out / "results.json").read_text())
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert run.stdout.rstrip().endswith("(a dry run of the script).**"), "the summary table is printed last"
    assert "NO GPU" in run.stdout and results["gpu"] is False
    assert all(stage["status"] == "ok" for stage in results["stages"].values()), results["stages"]
    engine = json.loads((out / "engine.json").read_text())
    assert engine["batch_1"]["ms_per_step"] > 0 and "aten::" in engine["batch_1"]["profile"]
    assert engine["async_scheduling"]["enabled"] and engine["read_each_step_1"]["ms_per_step"] > 0  # both ways
    server = json.loads((out / "server.json").read_text())
    for level in (server["c_1"], server["c_4"]):
        assert level["errors"] == 0 and level["tokens_per_request_min"] == 8, level  # ignore_eos: all 8 tokens
        assert level["ttft_p50_ms"] > 0 and level["itl_p50_ms"] is not None
    assert server["cold_start_s"] > 0
    hf = json.loads((out / "hf.json").read_text())
    assert hf["batch_2"]["tok_per_s"] > 0
    report = (out / "results.md").read_text()
    assert "server c=4 (" in report and "each step read before the next is planned" in report
    assert "device copy bandwidth" in report and "skipped" in report  # tests/gpu ran and skipped without CUDA
    assert_workloads(results["measured"]["workloads"], report)
    assert results["measured"]["engine"]["batch_1"]["ms_per_step"] > 0  # results.json holds every stage's figures


def assert_workloads(workloads, report):
    """What users send: every cell decoded, the sampled and shared-prefix rows are there, the floor grows."""
    cells = {key: row for key, row in workloads.items() if key.rpartition("_c")[2].isdigit()}
    expected = {f"greedy_ctx{context}_c{batch}" for context in (16, 32, 64) for batch in (1, 2)}
    expected |= {"sampled_ctx32_c1", "sampled_ctx32_c2", "shared_prefix_c2"}
    assert set(cells) == expected, sorted(cells)
    for key, row in cells.items():
        assert row["tok_per_s"] > 0 and row["step_method_ms_p50"] > 0, (key, row)
        assert 0 < row["floor_share"] and row["floor_ms"] > 0, (key, row)  # bandwidth.json was there
        assert row["steps"]["fixed_shape_eager"] > 0 and row["steps"]["graph"] == 0, (key, row)  # no CUDA
    read = [cells[f"greedy_ctx{context}_c2"]["bytes_per_step"] for context in (16, 32, 64)]
    assert read == sorted(read) and read[0] < read[-1], read  # more context, more KV read per step
    shared = cells["shared_prefix_c2"]
    assert shared["prefix_hit_tokens"] > 0 and shared["first_token_ms_p50"] > 0, shared
    assert "| sampled | 32 | 2 |" in report and "| shared_prefix |" in report
