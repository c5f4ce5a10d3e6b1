"""The pure parts of `make bench` (scripts/bench): settings, prompt building, /metrics parsing, the peak poller,
the workload tables and the report that keeps workloads a run did not rerun. No server is started."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))

import config  # noqa: E402
import load  # noqa: E402
import plot  # noqa: E402
import prompts  # noqa: E402
import report_workloads as rw  # noqa: E402
import server_metrics as sm  # noqa: E402
import workloads  # noqa: E402
from report import SystemResult, cpu_identity  # noqa: E402


def words(text: str) -> int:
    """A stand-in tokenizer: one token per word."""
    return len(text.split())


def test_workloads_and_systems_from_env():
    cfg = config.from_env({"BENCH_WORKLOADS": "capacity, prefix", "BENCH_SYSTEMS": "ours,ours-slots"})
    assert cfg.workloads == ("capacity", "prefix")
    assert workloads.systems_for("capacity", cfg) == ("ours", "ours-slots")
    assert workloads.systems_for("prefix", cfg) == ("ours",)
    assert config.from_env({}).workloads == ("standard", "capacity", "prefix", "speculative")
    assert config.from_env({"BENCH_CAPACITY_PROMPT_TOKENS": "50,70"}).capacity_prompt_tokens == (50, 70)
    for bad in ({"BENCH_WORKLOADS": "capacity,huge"}, {"BENCH_CAPACITY_PROMPT_TOKENS": "600,200"}):
        with pytest.raises(ValueError):
            config.from_env(bad)


def test_capacity_prompts_are_different_deterministic_and_in_range():
    made = prompts.capacity_prompts(64, 200, 600, words)
    assert made == prompts.capacity_prompts(64, 200, 600, words)
    assert len(set(made)) == 64
    assert all(200 <= words(p) <= 600 for p in made)
    assert max(map(words, made)) - min(map(words, made)) > 200  # spread over the range, not one length
    openings = {p.split("question. ", 1)[1][:40] for p in made}  # after "Request N: ...", the shuffled notes
    assert len(openings) > 30  # of 40 possible first questions


def test_shared_system_prompt_lands_just_under_its_target():
    system = prompts.shared_system_prompt(1000, words)
    assert 995 <= words(system) <= 1000
    chats = prompts.with_system(system, ["a?", "b?"])
    assert [c[0]["content"] for c in chats] == [system, system] and chats[1][1] == {"role": "user", "content": "b?"}


def test_workload_levels_and_settings():
    cfg = config.from_env({"BENCH_PREFIX_REQUESTS": "5", "BENCH_PREFIX_SYSTEM_TOKENS": "300"})
    prefix = workloads.shared_prefix(cfg, words)
    assert prefix.levels == ((1, 5), (8, 5)) and len(prefix.prompts) == 5
    assert prefix.settings["system_tokens"] <= 300 and prefix.warmup[0] == prefix.prompts[0][0]
    cap = workloads.capacity(config.from_env({}), words)
    assert cap.levels == ((64, 64),) and cap.max_tokens == 64
    assert cap.ours_env == {"MAX_BATCH_TOTAL_TOKENS": "32768", "MAX_TOTAL_TOKENS": "4096"}


def test_chat_body_takes_a_message_list():
    endpoint = load.Endpoint("http://x", "m", {"ignore_eos": True})
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    assert load.chat_body(endpoint, messages, 4)["messages"] == messages
    assert load.chat_body(endpoint, "q", 4)["messages"] == [{"role": "user", "content": "q"}]


def test_summary_counts_prompt_and_cached_tokens():
    results = [
        load.RequestResult(ok=True, ttft_s=0.1, output_tokens=4, prompt_tokens=300, cached_tokens=256),
        load.RequestResult(ok=True, ttft_s=0.2, output_tokens=4, prompt_tokens=310, cached_tokens=0),
        load.RequestResult(ok=False, error="x"),
    ]
    level = load.summarize(2, results, 1.0)
    assert (level.prompt_tokens_min, level.prompt_tokens_max, level.cached_tokens) == (300, 310, 256)
    assert load.summarize(1, [load.RequestResult(ok=True, output_tokens=1)], 1.0).cached_tokens is None


METRICS = """# HELP serve_batch_current_size Sequences in the running batch
# TYPE serve_batch_current_size gauge
serve_batch_current_size 3.0
serve_prefix_cache_hits_total 512.0
serve_prefix_cache_hits_created 1.7e+09
vllm:num_requests_running{engine="0",model_name="/a b/c"} 5.0
vllm:num_requests_running{engine="1",model_name="/a b/c"} 2.0
broken_line
"""


def test_parse_metrics_sums_labels_and_skips_junk():
    values = sm.parse_metrics(METRICS)
    assert values["serve_batch_current_size"] == 3.0
    assert values["serve_prefix_cache_hits_total"] == 512.0
    assert values["vllm:num_requests_running"] == 7.0
    assert "broken_line" not in values


def test_peak_poller_keeps_the_largest_reading():
    readings = iter([{"g": 1.0}, None, {"g": 6.0, "k": 10.0}, {"g": 2.0}, {}])
    poller = sm.PeakPoller(lambda: next(readings), ("g", "k", ""))
    for _ in range(5):
        poller.poll_once()
    assert poller.peaks == {"g": 6.0, "k": 10.0} and poller.samples == 4


def test_peak_poller_thread_polls_until_stopped():
    calls = []
    with sm.PeakPoller(lambda: calls.append(1) or {"g": float(len(calls))}, ("g",), interval_s=0.01) as poller:
        deadline = time.monotonic() + 30
        while len(calls) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
    count = len(calls)
    assert poller.peaks["g"] >= 5 and len(calls) == count  # stopped: no more scrapes after exit


def _poller(peaks: dict[str, float]) -> sm.PeakPoller:
    poller = sm.PeakPoller(lambda: peaks, tuple(peaks))
    poller.poll_once()
    return poller


def test_level_figures_prefer_the_peak_gauge_and_diff_counters():
    before = {"serve_prefix_cache_queries_total": 100.0, "serve_prefix_cache_hits_total": 0.0}
    after = {
        "serve_batch_peak_size": 33.0,
        "serve_prefix_cache_queries_total": 1100.0,
        "serve_prefix_cache_hits_total": 750.0,
        "serve_preemptions_total": 2.0,
        "serve_kv_blocks_total": 2048.0,
    }
    figures = sm.level_figures(sm.OURS_METRICS, before, after, _poller({"serve_batch_current_size": 30.0}))
    assert figures["peak_running"] == 33 and figures["peak_running_polled"] == 30
    assert figures["peak_source"].startswith("serve_batch_peak_size")
    assert figures["prefix_hit_rate"] == 0.75 and figures["preemptions"] == 2 and figures["kv_blocks_total"] == 2048


def test_level_figures_fall_back_to_the_polled_gauge():
    figures = sm.level_figures(
        sm.OURS_METRICS, {}, {"serve_batch_current_size": 0.0}, _poller({"serve_batch_current_size": 8.0})
    )
    assert figures["peak_running"] == 8 and "polled" in figures["peak_source"]
    assert figures["prefix_hit_rate"] is None and figures["preemptions"] is None


def _level(concurrency: int, tok_s: float, ttft: float | None, **extra) -> dict:
    return {
        "concurrency": concurrency,
        "requests": 64,
        "errors": 0,
        "output_tok_per_s": tok_s,
        "ttft_p50_ms": ttft,
        "ttft_p95_ms": ttft and ttft * 2,
        "latency_p50_ms": 1.0,
        **extra,
    }


def test_capacity_table_and_targets():
    results = [
        SystemResult("ours", status="ok", levels=[_level(64, 150.0, 900.0, peak_running=40, peak_source="gauge")]),
        SystemResult("ours-slots", status="ok", levels=[_level(64, 75.0, 5000.0, peak_running=8)]),
        SystemResult("vllm", status="timed out"),
    ]
    table = rw.capacity_table(results)
    assert "| ours | 64 | 64 | 0 | 40 | 150.0 | 900 | 1,800 |" in table[2]
    assert "**timed out**" in table[4]
    targets = "\n".join(rw.capacity_targets(results))
    assert "ours 40 vs ours-slots 8: 5.00×" in targets and "2.00× of ours-slots" in targets
    assert rw.capacity_targets(results[:1]) == []  # no slot engine in this run: no comparison


def test_prefix_table_and_targets():
    results = [
        SystemResult("ours", levels=[_level(1, 9.0, 100.0, prefix_hit_rate=0.9412, cached_tokens=38400)]),
        SystemResult("ours-nocache", levels=[_level(1, 7.0, 800.0, prefix_hit_rate=None)]),
        SystemResult("vllm", levels=[_level(1, 8.0, 200.0)]),
    ]
    table = rw.prefix_table(results)
    assert "| 94% | 38,400 |" in table[2] and "| n/a | n/a |" in table[3]
    assert rw.prefix_targets(results) == [
        "- c=1: TTFT p50 with caching is 0.12× of ours without (target ≤ 0.20×) and 0.50× of vLLM's (target ≤ 1×)."
    ]


def test_plot_series_sorts_levels_and_skips_systems_without_any():
    results = [SystemResult("a", levels=[_level(8, 2.0, 5.0), _level(1, 1.0, None)]), SystemResult("b")]
    assert plot.series(results) == {"a": ([1, 8], [1.0, 2.0], [None, 5.0])}


def _cfg(tmp_path: Path, **env: str) -> config.BenchConfig:
    paths = {"BENCH_OUTPUT_MD": str(tmp_path / "b.md"), "BENCH_OUTPUT_JSON": str(tmp_path / "b.json")}
    return config.from_env({**paths, **env})


INFO = {
    "date": "today",
    "machine": {"nproc": 2, "cpu_model": "x", "ram_gib": 1, "os": "L", "python": "3"},
    "model": "m",
    "model_dir": "/m",
    "loader_dir": "/m",
    "n_prompts": 40,
}


def test_a_run_of_one_workload_keeps_the_others_from_the_last_report(tmp_path):
    cfg = _cfg(tmp_path)
    old = {"date": "last week", "systems": [{"system": "vllm", "status": "ok", "levels": [_level(1, 11.0, 240.0)]}]}
    cfg.output_json.write_text(json.dumps(old))  # a report from before the workloads
    capacity = rw.WorkloadRun(
        "capacity",
        "today",
        {
            "requests": 64,
            "concurrency": 64,
            "prompt_tokens": [200, 600],
            "max_tokens": 64,
            "kv_tokens": 32768,
            "max_model_len": 4096,
        },
    )
    capacity.results.append(SystemResult("ours", status="ok", levels=[_level(64, 150.0, 900.0, peak_running=40)]))
    rw.write_all({"capacity": capacity}, cfg, INFO)
    page = cfg.output_md.read_text()
    assert "from the run of last week" in page and "| vllm | 1 | 64 | 0 | 11.0 | 240 |" in page
    assert "## Capacity: concurrent sequences in a fixed KV budget" in page and "| ours | 64 | 64 | 0 | 40 |" in page
    saved = json.loads(cfg.output_json.read_text())
    assert set(saved["workloads"]) == {"standard", "capacity"} and saved["systems"][0]["system"] == "vllm"
    prefix = rw.WorkloadRun(
        "prefix", "tomorrow", {"system_tokens": 998, "requests": 40, "concurrency": [1, 8], "max_tokens": 32}
    )
    prefix.results.append(SystemResult("ours", status="ok", levels=[_level(1, 9.0, 100.0, prefix_hit_rate=0.5)]))
    rw.write_all({"prefix": prefix}, cfg, INFO)  # the next run reruns only the prefix workload
    page = cfg.output_md.read_text()
    assert "| ours | 64 | 64 | 0 | 40 |" in page and "| 50% |" in page and "Run on tomorrow" in page
    assert page.index("## Capacity") < page.index("## Shared prefix") < page.index("## Reproduce")
    assert set(json.loads(cfg.output_json.read_text())["workloads"]) == {"standard", "capacity", "prefix"}


def test_the_plot_is_written_and_linked(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = _cfg(tmp_path)
    standard = rw.WorkloadRun("standard", "today", {})
    standard.results.append(SystemResult("ours", levels=[_level(1, 10.0, 200.0), _level(8, 40.0, 800.0)]))
    rw.write_all({"standard": standard}, cfg, INFO)
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert "](b.png)" in cfg.output_md.read_text()


def test_the_machine_line_tells_cpu_generations_apart():
    zen5 = (
        "processor\t: 0\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n"
        "flags\t\t: avx2 avx512f avx512_bf16 avx512_vp2intersect\n"
    )
    zen4 = zen5.replace("26", "25").replace(" avx512_vp2intersect", "")
    assert cpu_identity(zen5) == "AMD EPYC (family 26 model 2; avx2, avx512f, avx512_bf16, avx512_vp2intersect)"
    assert cpu_identity(zen4) == "AMD EPYC (family 25 model 2; avx2, avx512f, avx512_bf16)"
    assert (
        cpu_identity("Features\t: fp asimd\n")
        == "? (none of avx2, avx512f, avx512_bf16, avx512_vp2intersect, amx_bf16)"
    )
