"""An engine in a spawned process answers exactly as the in-process engine does, takes adapters through typed
messages, and its failures reach the front as errors, never as hung streams or orphan processes; one that dies
comes back with its adapters, one that freezes is out of rotation and holds no request past its deadline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from serve.engine import FinishReason, Request, SamplingParams
from serve.engine.adapters import AdapterError
from serve.engine.front_pipe import PipeWriter
from serve.engine.process import EngineProcess
from serve.front.context import RequestContext
from serve.front.generation import GenerationService, ValidRequest
from serve.loading.loader import load_tokenizer, prepare_model
from serve.metrics import Metrics
from serve.wiring import build_engine, engine_config, serve_engine_copy
from tests.helpers import TINY_KV_TOKENS, wait_for
from tests.unit.test_lora import make_adapter

PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def process_settings(tiny_settings):
    return replace(tiny_settings, max_concurrent_requests=4)


@pytest.fixture(scope="module")
def tokenizer(process_settings):
    return load_tokenizer(process_settings, prepare_model(process_settings))


@pytest.fixture(scope="module")
def engine_process(process_settings):
    engine = EngineProcess(
        serve_engine_copy, (process_settings, prepare_model(process_settings), 0), engine_config(process_settings)
    ).start()
    assert engine.wait_ready(120), engine.load_error
    yield engine
    engine.stop()


def generate(engine, tokenizer, text: str, tokens: int = 12, adapter=None, **params) -> list[int]:
    ids = tokenizer(text)["input_ids"]
    request = Request(prompt_ids=ids, params=SamplingParams(max_new_tokens=tokens, **params), adapter=adapter)
    events = list(engine.submit(request))
    assert events[-1].finish_reason is FinishReason.LENGTH, events[-1]
    return [event.token_id for event in events if event.token_id is not None]


def test_greedy_and_seeded_tokens_equal_the_in_process_engines(engine_process, tiny_engine, tokenizer):
    for text in PROMPTS:
        assert generate(engine_process, tokenizer, text) == generate(tiny_engine, tokenizer, text)
    sampled = {"temperature": 0.8, "top_p": 0.9, "seed": 7}
    ours = generate(engine_process, tokenizer, PROMPTS[0], **sampled)
    assert ours == generate(tiny_engine, tokenizer, PROMPTS[0], **sampled)


def test_the_front_knows_the_model_limits_and_counters_without_its_weights(engine_process, tiny_engine, tokenizer):
    assert engine_process.limits == replace(tiny_engine.limits, max_batch_size=4)  # its own cap
    assert engine_process.loaded.name == tiny_engine.loaded.name
    assert engine_process.loaded.model.config.vocab_size == tiny_engine.loaded.model.config.vocab_size
    assert (engine_process.loaded.device.type, engine_process.loaded.dtype) == ("cpu", "torch.float32")
    assert not hasattr(engine_process.loaded.model, "forward")  # a description, not the model
    assert not hasattr(engine_process.loaded, "tokenizer")  # the front loads its own
    assert engine_process.eos_ids == frozenset(tiny_engine.eos_ids)
    before = engine_process.stats().steps
    generate(engine_process, tokenizer, PROMPTS[1])
    deadline = time.monotonic() + 5
    while engine_process.stats().steps < before + 12 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine_process.stats().steps >= before + 12
    assert engine_process.in_flight == 0
    assert engine_process.describe()[0].served == engine_process.served > 0


def test_a_cancelled_request_ends_cancelled_and_leaves_the_count(engine_process, tokenizer):
    ids = tokenizer(PROMPTS[0])["input_ids"]
    stream = engine_process.submit(Request(prompt_ids=ids, params=SamplingParams(max_new_tokens=1000)))
    first = next(iter(stream))
    assert first.finish_reason is None
    stream.close()
    final = [event for event in stream][-1]
    assert final.finish_reason is FinishReason.CANCELLED
    assert engine_process.in_flight == 0


def test_an_adapter_is_installed_from_its_folder_and_retired_by_message(engine_process, tokenizer, tmp_path):
    ids = tokenizer(PROMPTS[0])["input_ids"]
    unknown = list(engine_process.submit(Request(prompt_ids=ids, params=SamplingParams(), adapter="sql")))
    assert unknown[-1].finish_reason is FinishReason.ERROR and unknown[-1].error == "adapter 'sql' is not loaded"
    with pytest.raises(AdapterError, match="adapter 'sql'.*needs adapter_config.json"):
        engine_process.install_adapter("sql", 1, str(tmp_path)).result(60)
    folder = make_adapter(Path(engine_process.loaded.name), tmp_path / "sql", seed=1)
    engine_process.install_adapter("sql", 7, str(folder)).result(60)
    base = generate(engine_process, tokenizer, PROMPTS[0])
    assert generate(engine_process, tokenizer, PROMPTS[0], adapter="sql") != base
    with pytest.raises(AdapterError, match="install number 7 is taken"):
        engine_process.install_adapter("chat", 7, str(folder)).result(60)
    engine_process.retire_adapter("sql").result(60)
    gone = list(engine_process.submit(Request(prompt_ids=ids, params=SamplingParams(), adapter="sql")))
    assert gone[-1].finish_reason is FinishReason.ERROR
    assert engine_process.in_flight == 0


@pytest.fixture(scope="module")
def recovering(process_settings):
    """A pool of one engine process that counts as stalled after 1 s without a step while it has work."""
    engine = build_engine(replace(process_settings, engine_stall_timeout_s=1.0)).start()
    assert engine.wait_ready(120), engine.load_error
    yield engine
    engine.stop()


def test_the_engine_process_ignores_sigterm_and_sigint_sent_to_its_group(recovering):
    (copy,) = recovering.engines
    pid = copy.pid
    for sig in (signal.SIGTERM, signal.SIGINT):
        os.kill(pid, sig)
    assert generate(recovering, recovering.tokenizer, PROMPTS[2])  # both arrived before it answered
    assert copy.pid == pid and not copy.exited and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE


def test_a_killed_engine_process_fails_its_streams_and_comes_back_with_its_adapters(recovering, tmp_path):
    (copy,) = recovering.engines
    folder = make_adapter(Path(copy.loaded.name), tmp_path / "sql", seed=1)
    later = make_adapter(Path(copy.loaded.name), tmp_path / "chat", seed=2)
    copy.install_adapter("sql", 7, str(folder)).result(60)
    before = [generate(recovering, recovering.tokenizer, PROMPTS[0], adapter=name) for name in (None, "sql")]
    steps, pid = recovering.stats().steps, copy.pid
    ids = recovering.tokenizer(PROMPTS[0])["input_ids"]  # the pool's own tokenizer
    stream = recovering.submit(Request(ids, SamplingParams(max_new_tokens=1000, ignore_eos=True)))
    assert next(iter(stream)).finish_reason is None
    os.kill(pid, signal.SIGKILL)
    final = [event for event in stream][-1]
    assert final.finish_reason is FinishReason.ERROR and "engine process exited (code -9)" in final.error
    assert recovering.in_flight == 0 and recovering.load_error is None
    copy.install_adapter("chat", 8, str(later)).result(60)  # registered while the copy is down or reloading
    assert wait_for(lambda: recovering.ready and copy.restarts == 1, timeout=120)
    assert copy.pid != pid and recovering.stats().restarts == 1 and recovering.stats().steps >= steps
    after = [generate(recovering, recovering.tokenizer, PROMPTS[0], adapter=name) for name in (None, "sql")]
    assert after == before and before[0] != before[1]  # the same model, and the adapter installed again
    assert generate(recovering, recovering.tokenizer, PROMPTS[0], adapter="chat") not in before


def test_a_frozen_engine_process_is_stalled_and_a_deadline_holds_by_the_fronts_clock(recovering, process_settings):
    (copy,) = recovering.engines
    service = GenerationService(recovering, process_settings, Metrics(recovering))
    ids = recovering.tokenizer(PROMPTS[1])["input_ids"]
    valid = ValidRequest(None, (ids,), (SamplingParams(max_new_tokens=1000, ignore_eos=True),))
    collected: list = []
    restarts = copy.restarts
    os.kill(copy.pid, signal.SIGSTOP)
    try:
        generation = service.start(valid, RequestContext("/invocations", None, deadline=time.monotonic() + 1.0))
        reader = threading.Thread(target=lambda: collected.extend(service.collect(generation)), daemon=True)
        reader.start()
        assert wait_for(lambda: copy.stalled, timeout=30)
        assert not recovering.ready and recovering.recovery_state == "stalled"
        assert service.tokenizer is recovering.tokenizer  # what answers render with stays known
        reader.join(60)  # a guard against a hang: the deadline is 1 s away
        assert not reader.is_alive(), "the answer waited on a frozen engine past its deadline"
    finally:
        os.kill(copy.pid, signal.SIGCONT)
    assert collected[0].final.finish_reason is FinishReason.LENGTH and generation.deadline_hit
    assert wait_for(lambda: recovering.ready and recovering.in_flight == 0, timeout=60)
    assert copy.restarts == restarts  # waited out, not restarted


def test_a_load_failure_reaches_the_front_and_the_process_ends(process_settings, tiny_model_dir, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):  # the model's files but its weights
        (tmp_path / name).write_text((tiny_model_dir / name).read_text())
    broken = replace(process_settings, model_id=str(tmp_path))
    failures = []
    engine = build_engine(broken, on_load_failure=failures.append).start()
    deadline = time.monotonic() + 60
    while not failures:
        assert time.monotonic() < deadline, "no load failure reported"
        time.sleep(0.1)
    assert not engine.ready and "safetensors" in str(failures[0]), failures
    pid = engine.engines[0].pid
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the engine process outlived its load failure"
        time.sleep(0.1)
    engine.stop()


def test_stop_ends_the_engine_process(process_settings):
    engine = build_engine(process_settings).start()
    assert engine.wait_ready(120), engine.load_error
    process = psutil.Process(engine.engines[0].pid)
    engine.stop()
    assert not process.is_running() or process.status() == psutil.STATUS_ZOMBIE


def test_a_front_that_exits_stops_its_engine_process_quietly(tiny_model_dir, tmp_path):
    """No stop() called (a worker's normal exit): the engine process is asked to stop, not found dead."""
    script = tmp_path / "front.py"
    script.write_text(
        "import sys\n"
        "from serve.config import Settings\n"
        "from serve.wiring import build_engine\n"
        "from serve.log import configure_logging\n"
        "if __name__ == '__main__':\n"
        "    configure_logging()\n"
        f"    settings = Settings(model_id={str(tiny_model_dir)!r}, model_dir='/nonexistent', dtype='float32',\n"
        f"                        max_batch_total_tokens={TINY_KV_TOKENS})\n"
        "    engine = build_engine(settings).start()\n"
        "    assert engine.wait_ready(120), engine.load_error\n"
        "    print('pid', engine.engines[0].pid, flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    pid = int(done.stdout.split()[-1])
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "engine process exited" not in done.stderr, done.stderr[-2000:]


def test_sending_to_a_frozen_engine_never_blocks_the_caller():
    """A frozen engine process stops reading and its pipe fills up: submits and cancels still return at once."""
    unfrozen, sent = threading.Event(), []

    class FullPipe:
        def send(self, message):
            unfrozen.wait()
            sent.append(message)

        def close(self):
            sent.append("closed")

    writer = PipeWriter(FullPipe())
    assert [writer.send(message) for message in ("submit", "cancel")] == [True, True]
    unfrozen.set()
    writer.close()
    assert wait_for(lambda: sent == ["submit", "cancel", "closed"]) and not writer.send("late")
