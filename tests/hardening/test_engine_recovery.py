"""The engine process, killed or frozen under the real gunicorn: a dead one is restarted (503 only while it
reloads), one crash too many stops the server, a frozen one makes /ping unhealthy without holding an invocation
past its deadline, a SIGTERM to the whole process group drains, and with two copies the survivor keeps serving."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest
import requests

from tests.hardening.conftest import gauge
from tests.helpers import Server, sse_data, start_server, streamed_chat, wait_for

pytestmark = pytest.mark.e2e

DRAINED_TOKENS = 40  # a third of a second on the deep tiny model, well within the 21 s drain on a busy host

LONG_PARAMETERS = {"max_new_tokens": 400, "ignore_eos": True, "details": True}
LONG_GENERATE = {"inputs": "Once upon a time", "parameters": LONG_PARAMETERS}


def engine_pids(server: Server) -> list[int]:
    """The engine processes under the server (spawned children of its worker)."""
    pids = []
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return sorted(pids)


def ping(server: Server) -> tuple[int, str]:
    response = requests.get(server.url + "/ping", timeout=10)
    return response.status_code, response.json()["status"]


def pings_until_healthy(server: Server, most: int = 3_000) -> list[tuple[int, str]]:
    """Every /ping answer, a tenth of a second apart, until one is 200."""
    seen = [ping(server)]
    while seen[-1][0] != 200:
        assert len(seen) < most, f"never healthy again: {seen[-3:]}"
        time.sleep(0.1)
        seen.append(ping(server))
    return seen


def counter(server: Server, name: str) -> float:
    """A counter's value in /metrics (prometheus-client writes it as ``name_total``)."""
    return gauge(server, name + "_total")


@pytest.fixture(scope="module")
def recovering_server(slow_model_dir, tmp_path_factory) -> Server:
    env = {
        "HF_MODEL_ID": str(slow_model_dir),
        "ENGINE_STALL_TIMEOUT_S": "2",
        "INVOCATION_TIMEOUT": "8",
        "INVOCATION_TIMEOUT_MARGIN": "3",
    }
    server = start_server(env, tmp_path_factory.mktemp("recovering"))
    yield server
    server.stop()


def test_a_killed_engine_process_is_restarted_and_serves_again(recovering_server):
    server = recovering_server
    (pid,) = engine_pids(server)
    failed: list = []
    waiter = threading.Thread(
        target=lambda: failed.append(requests.post(server.url + "/generate", json=LONG_GENERATE, timeout=120))
    )
    waiter.start()
    assert wait_for(lambda: gauge(server, "serve_requests_in_flight") == 1, timeout=30)
    os.kill(pid, signal.SIGKILL)
    waiter.join(120)
    assert failed[0].status_code == 424 and "engine process exited (code -9)" in failed[0].text
    assert set(pings_until_healthy(server)) == {(503, "restarting"), (200, "healthy")}  # 503 only while reloading
    assert engine_pids(server) != [pid] and len(engine_pids(server)) == 1
    served = requests.post(
        server.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}}, timeout=60
    )
    assert served.status_code == 200, served.text
    assert counter(server, "serve_engine_restarts") == 1 and gauge(server, "serve_engines_ready") == 1
    assert "its engine process died" in server.log() and "engine process restarted" in server.log()


def test_a_frozen_engine_makes_ping_unhealthy_and_the_invocation_keeps_its_deadline(recovering_server):
    server = recovering_server
    (pid,) = engine_pids(server)
    answers: list = []
    caller = threading.Thread(
        target=lambda: answers.append(requests.post(server.url + "/invocations", json=LONG_GENERATE, timeout=120))
    )
    caller.start()
    assert wait_for(lambda: gauge(server, "serve_requests_in_flight") == 1, timeout=30)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert wait_for(lambda: ping(server) == (503, "stalled"), timeout=60, interval=0.2)
        caller.join(60)
        assert answers, "the invocation waited on the frozen engine"  # answered while the engine is still stopped
    finally:
        os.kill(pid, signal.SIGCONT)
    assert answers[0].status_code == 200 and answers[0].headers["X-Finish-Reason"] == "deadline", answers[0].text
    assert answers[0].json()[0]["details"]["finish_reason"] == "length"
    assert wait_for(lambda: ping(server)[0] == 200, timeout=60, interval=0.2)
    assert "made no engine step for 2 s" in server.log()
    assert wait_for(lambda: "is stepping again" in server.log(), timeout=10)


def test_one_crash_more_than_engine_max_restarts_stops_the_server(tiny_model_dir, tmp_path):
    server = start_server({"HF_MODEL_ID": str(tiny_model_dir), "ENGINE_MAX_RESTARTS": "1"}, tmp_path)
    try:
        (first,) = engine_pids(server)
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: engine_pids(server) not in ([], [first]) and ping(server)[0] == 200, timeout=180)
        (second,) = engine_pids(server)
        os.kill(second, signal.SIGKILL)
        assert server.process.wait(120) != 0  # the worker exits; gunicorn stops; the platform replaces the instance
        assert "more than ENGINE_MAX_RESTARTS=1; giving up so the instance is replaced" in server.log()
    finally:
        server.stop()


def test_a_sigterm_to_the_whole_process_group_drains_in_flight_requests(slow_model_dir, tmp_path):
    server = start_server({"HF_MODEL_ID": str(slow_model_dir), "MAX_CONCURRENT_REQUESTS": "4"}, tmp_path)
    try:
        (pid,) = engine_pids(server)
        warm = requests.post(server.url + "/v1/chat/completions", json=streamed_chat(8), timeout=120)
        assert warm.status_code == 200  # the first request of a fresh engine is the slowest
        chat = streamed_chat(DRAINED_TOKENS)
        streaming = requests.post(server.url + "/v1/chat/completions", json=chat, stream=True, timeout=60)
        lines = streaming.iter_lines()
        next(lines)
        os.killpg(server.process.pid, signal.SIGTERM)  # systemd's default, `tini -g`, a terminal's hang-up
        data = sse_data("\n".join(line.decode() for line in lines))
        assert data[-1] == "[DONE]", data[-3:]
        assert json.loads(data[-2])["usage"]["completion_tokens"] == DRAINED_TOKENS
        assert server.process.wait(60) == 0
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        server.stop()


def test_with_two_copies_a_dead_one_leaves_rotation_and_the_other_keeps_serving(tiny_model_dir, tmp_path):
    env = {"HF_MODEL_ID": str(tiny_model_dir), "PLACEMENT": "replicas", "REPLICAS": "2", "DTYPE": "float32"}
    server = start_server(env, tmp_path, timeout=300)
    try:
        first, second = engine_pids(server)
        os.kill(first, signal.SIGKILL)
        assert wait_for(lambda: gauge(server, "serve_engines_ready") == 1, timeout=30)  # noticed: out of rotation
        answers = []
        while not (gauge(server, "serve_engines_ready") == 2 and counter(server, "serve_engine_restarts") == 1):
            assert ping(server) == (200, "healthy")  # one ready copy is enough
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
            answers.append(requests.post(server.url + "/generate", json=body, timeout=60).status_code)
            assert len(answers) < 2_000, "the dead copy never came back"
        assert set(answers) == {200} and second in engine_pids(server) and first not in engine_pids(server)
    finally:
        server.stop()
