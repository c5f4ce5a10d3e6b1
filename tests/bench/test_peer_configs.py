"""The peers' configurations in `make bench`: which rows run, what each sets, how preloads are found, and the ratio
against each peer's best row. No server is started."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "bench"))

import config  # noqa: E402
import installs  # noqa: E402
import peer_configs as pc  # noqa: E402
import peer_report  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import systems  # noqa: E402
from report import SystemResult  # noqa: E402
from report_workloads import WorkloadRun  # noqa: E402


def level(concurrency: int, tok_s: float, errors: int = 0) -> dict:
    timings = {"ttft_p50_ms": 100.0, "ttft_p95_ms": 150.0, "latency_p50_ms": 900.0}
    return {"concurrency": concurrency, "requests": 8, "errors": errors, "output_tok_per_s": tok_s, **timings}


def vllm_row(key: str, *levels: dict) -> SystemResult:
    config = pc.configs("vllm", (key,), cpus=[0, 1])[0]
    return SystemResult(config.label, family="vllm", config=config.record(), levels=list(levels), status="ok")


def test_cpu_lists_use_vllms_range_syntax():
    assert pc.cpu_list([1, 0]) == "0-1"
    assert pc.cpu_list([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert pc.cpu_list([3]) == "3"


def test_each_vllm_configuration_is_named_by_what_it_sets():
    rows = {c.key: c for c in pc.configs("vllm", pc.VLLM_CONFIGS, cpus=[0, 1, 2, 5])}
    assert (rows["default"].label, rows["default"].env, rows["default"].preloads) == ("vllm", {}, ())
    assert rows["all-cores"].env == {"VLLM_CPU_OMP_THREADS_BIND": "0-2,5", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    assert rows["all-cores"].label == "vllm bind=0-2,5 reserved=0"
    assert rows["all-cores-preload"].label == "vllm bind=0-2,5 reserved=0 +tcmalloc +iomp"
    assert rows["all-cores-preload"].preloads == ("tcmalloc", "iomp") and rows["default-preload"].env == {}
    assert len({c.slug for c in rows.values()}) == 4  # one log file each
    default, spare = pc.configs("transformers", pc.TRANSFORMERS_CONFIGS, cpus=[0, 1, 2])
    assert (default.label, default.env) == ("transformers", {})
    assert (spare.label, spare.env) == ("transformers OMP_NUM_THREADS=2", {"OMP_NUM_THREADS": "2"})
    assert [c.key for c in pc.configs("transformers", pc.TRANSFORMERS_CONFIGS, cpus=[0])] == ["default"]


def test_configuration_keys_come_from_the_environment():
    cfg = config.from_env({"BENCH_VLLM_CONFIGS": "all-cores, default", "BENCH_TRANSFORMERS_CONFIGS": "default"})
    assert cfg.vllm_configs == ("all-cores", "default") and cfg.transformers_configs == ("default",)
    assert config.from_env({}).vllm_configs == pc.VLLM_CONFIGS
    with pytest.raises(ValueError, match="BENCH_VLLM_CONFIGS"):
        config.from_env({"BENCH_VLLM_CONFIGS": "all-cores,turbo"})


def test_vllm_means_every_configuration_in_the_standard_workload():
    cfg = config.from_env({"BENCH_SYSTEMS": "ours,vllm"})
    rows = run.rows("standard", cfg, {})
    assert [system for system, _ in rows] == ["ours"] + ["vllm"] * 4
    assert [c.key for _, c in rows[1:]] == list(pc.VLLM_CONFIGS) and rows[0][1] is None
    one = run.rows("standard", config.from_env({"BENCH_SYSTEMS": "vllm", "BENCH_VLLM_CONFIGS": "all-cores"}), {})
    assert [c.key for _, c in one] == ["all-cores"]


def test_other_workloads_run_the_configuration_best_in_the_standard_one():
    cfg = config.from_env({"BENCH_SYSTEMS": "ours,vllm"})
    standard = WorkloadRun("standard", "today", {})
    standard.results = [
        vllm_row("default", level(1, 10.0), level(8, 50.0)),
        vllm_row("default-preload", level(1, 11.0), level(8, 90.0, errors=1)),  # errors: never the best
        vllm_row("all-cores", level(1, 20.0), level(8, 40.0)),
    ]
    assert [c.key for _, c in run.rows("prefix", cfg, {"standard": standard}) if c] == ["all-cores"]
    assert [c.key for _, c in run.rows("capacity", cfg, {}) if c] == ["all-cores"]  # no standard run: all cores
    only_default = config.from_env({"BENCH_SYSTEMS": "vllm", "BENCH_VLLM_CONFIGS": "default"})
    assert [c.key for _, c in run.rows("capacity", only_default, {})] == ["default"]


def test_the_ratio_is_taken_against_each_peers_best_row_per_concurrency():
    results = [
        SystemResult("ours", levels=[level(1, 30.0), level(8, 60.0), level(32, 99.0)]),
        vllm_row("default", level(1, 10.0), level(8, 50.0), level(32, 300.0, errors=2)),
        vllm_row("all-cores", level(1, 20.0), level(8, 40.0)),
        SystemResult("transformers", family="transformers", levels=[level(1, 15.0)]),
    ]
    best = peer_report.best_levels(results, "vllm")
    assert {c: row for c, (row, _) in best.items()} == {1: "vllm bind=0-1 reserved=0", 8: "vllm"}
    table = peer_report.ratio_table(results)
    assert table[2] == "| 1 | 30.0 | vllm bind=0-1 reserved=0 | 20.0 | 1.50× | transformers | 15.0 | 2.00× |"
    assert table[3] == "| 8 | 60.0 | vllm | 50.0 | 1.20× | – | n/a | n/a |"
    assert table[4] == "| 32 | 99.0 | – | n/a | n/a | – | n/a | n/a |"  # vLLM's only c=32 level had errors
    assert peer_report.ratio_table(results[:1]) == []


def test_a_configuration_that_could_not_be_set_up_keeps_its_row_with_the_reason():
    row = SystemResult("vllm +tcmalloc +iomp", family="vllm", status="not set up", reason="tcmalloc: no pip wheel")
    table = report.results_table([row])
    assert "| vllm +tcmalloc +iomp | – | – | – | **not set up**: tcmalloc: no pip wheel |" in table[2]


def test_the_method_lists_each_configuration_with_its_env_preloads_and_binding():
    config = pc.configs("vllm", ("all-cores-preload",), cpus=[0, 1])[0]
    record = config.record([Path("/x/libtcmalloc_minimal.so.4"), Path("/v/lib/libiomp5.so")])
    record["binding"] = ["local_rank=0, core ids=[0, 1]", "reserved_cpus=[]"]
    lines = peer_report.configuration_lines([SystemResult("ours"), SystemResult(config.label, config=record)])
    assert len(lines) == 2
    assert "`VLLM_CPU_OMP_THREADS_BIND=0-1`, `VLLM_CPU_NUM_OF_RESERVED_CPU=0`" in lines[1]
    assert "`LD_PRELOAD=/x/libtcmalloc_minimal.so.4:/v/lib/libiomp5.so`" in lines[1]
    assert "vLLM's log: `local_rank=0, core ids=[0, 1]`, `reserved_cpus=[]`" in lines[1]


def test_a_configuration_drops_what_the_callers_shell_set(monkeypatch, tmp_path):
    for key, value in (("VLLM_CPU_OMP_THREADS_BIND", "0-1"), ("LD_PRELOAD", "/old.so"), ("OMP_NUM_THREADS", "1")):
        monkeypatch.setenv(key, value)
    cfg = config.from_env({})
    default, preloaded = pc.configs("vllm", ("default", "all-cores-preload"), cpus=[0, 1])
    env = peers.vllm_spec(cfg, 1, tmp_path, tmp_path, config=default).env
    assert "VLLM_CPU_OMP_THREADS_BIND" not in env and "LD_PRELOAD" not in env
    spec = peers.vllm_spec(cfg, 1, tmp_path, tmp_path, config=preloaded, preloads=(Path("/a.so"), Path("/b.so")))
    assert spec.env["LD_PRELOAD"] == "/a.so:/b.so" and spec.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert spec.name == "vllm-all-cores-preload"
    default, spare = pc.configs("transformers", pc.TRANSFORMERS_CONFIGS, cpus=[0, 1])
    assert "OMP_NUM_THREADS" not in peers.transformers_spec(cfg, 1, tmp_path, tmp_path, default).env
    spec = peers.transformers_spec(cfg, 1, tmp_path, tmp_path, spare)
    assert spec.env["OMP_NUM_THREADS"] == "1" and spec.name == "transformers-one-core-free"


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x7fELF")
    return path


def test_preloads_are_found_in_the_venv_first_then_fetched(monkeypatch, tmp_path):
    venv, deb = tmp_path / "venv", tmp_path / "deb"
    iomp = touch(venv / "lib" / "libiomp5.so")
    bundled = touch(venv / "lib" / "python3.11" / "site-packages" / "vllm" / "libs" / "libtcmalloc_minimal.so.4")
    assert pc.find_library("tcmalloc", pc.library_dirs(venv)) == bundled
    bundled.unlink()
    assert pc.find_library("tcmalloc", [venv / "lib", tmp_path / "none"]) is None
    tcmalloc = touch(deb / "usr" / "lib" / "x86_64-linux-gnu" / "libtcmalloc_minimal.so.4")
    touch(deb / "usr" / "lib" / "x86_64-linux-gnu" / "libtcmalloc_minimal_debug.so.4")
    monkeypatch.setattr(pc, "library_dirs", lambda v, extra=(): [v / "lib", *extra])
    monkeypatch.setattr(installs, "library_dirs", pc.library_dirs)
    monkeypatch.setattr(installs, "unpacked_deb", lambda cfg, package: deb)
    cfg = config.from_env({"BENCH_WORK_DIR": str(tmp_path / "work")})
    assert installs.preload_paths(("tcmalloc", "iomp"), venv, cfg) == [tcmalloc, iomp]


def test_preloads_that_cannot_be_had_say_why(monkeypatch, tmp_path):
    def no_deb(cfg, package):
        raise peers.PeerFailed(f"apt-get download {package} failed")

    monkeypatch.setattr(installs, "library_dirs", lambda v, extra=(): [v / "lib", *extra])
    monkeypatch.setattr(installs, "unpacked_deb", no_deb)
    monkeypatch.setattr(installs, "install", lambda *args: (0.0, True))  # pip "installed" intel-openmp, no lib
    cfg = config.from_env({"BENCH_WORK_DIR": str(tmp_path / "work")})
    with pytest.raises(peers.PeerFailed) as failed:
        installs.preload_paths(("tcmalloc", "iomp"), tmp_path / "venv", cfg)
    why = failed.value.args[0]
    assert why.startswith("tcmalloc: no pip wheel ships it; Debian package libtcmalloc-minimal4 could not be had")
    assert "iomp: no libiomp5.so after installing pip package intel-openmp" in why


def test_vllms_log_gives_its_binding_and_the_preloads_it_missed(tmp_path):
    log = tmp_path / "vllm.log"
    log.write_text(
        "(EngineCore pid=1) INFO 12-07 10:51:05 [ompmultiprocessing.py:185] \tlocal_rank=0, core ids=[0]\n"
        "(EngineCore pid=1) INFO 12-07 10:51:05 [ompmultiprocessing.py:185] \treserved_cpus=[1]\n"
        "(Worker pid=2) WARNING 12-07 10:51:13 [cpu_worker.py:114] libtcmalloc is not found in LD_PRELOAD. For best\n"
        "(Worker pid=2) WARNING 12-07 10:51:13 [cpu_worker.py:114] libiomp is not found in LD_PRELOAD. For best\n"
    )
    assert systems.vllm_binding_lines(log) == ["local_rank=0, core ids=[0]", "reserved_cpus=[1]"]
    assert systems.vllm_preload_warnings(log) == ["vLLM warned that libiomp, libtcmalloc were not in LD_PRELOAD"]


def test_the_page_shows_the_configurations_and_the_best_row_ratio(tmp_path):
    cfg = config.from_env({"BENCH_OUTPUT_MD": str(tmp_path / "b.md"), "BENCH_OUTPUT_JSON": str(tmp_path / "b.json")})
    info = {"date": "today", "model": "m", "model_dir": "/m", "loader_dir": "/m", "n_prompts": 40}
    info["machine"] = {"nproc": 2, "cpu_model": "x", "ram_gib": 1, "os": "L", "python": "3"}
    results = [SystemResult("ours", levels=[level(1, 30.0)]), vllm_row("all-cores", level(1, 20.0))]
    page = report.markdown(results, cfg, info)
    setup, ratio = page.index("- **Peer configurations**"), page.index("| 1 | 30.0 | vllm bind=0-1 reserved=0 |")
    assert page.index("## Setup") < setup < page.index("## Results") < ratio < page.index("## Systems")
    assert "  - `vllm bind=0-1 reserved=0` (binding: all cores, none reserved;" in page
