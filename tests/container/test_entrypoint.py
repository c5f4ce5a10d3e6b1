"""The container contract through the real entrypoint and gunicorn, on a tiny random Llama."""

import subprocess
import time

import psutil
import pytest
import requests

from tests.helpers import ENTRYPOINT, free_port, server_env, start_server, wait_for

pytestmark = pytest.mark.e2e


def test_other_commands_are_executed_as_given():
    result = subprocess.run(
        [str(ENTRYPOINT), "echo", "hello from the container"], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 0 and result.stdout.strip() == "hello from the container"


def test_malformed_setting_stops_startup_with_one_clear_line(tmp_path):
    env = server_env({"SM_NUM_GPUS": "abc"}, free_port())
    result = subprocess.run([str(ENTRYPOINT), "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "configuration error: SM_NUM_GPUS='abc' is not an integer" in result.stderr
    assert "Traceback" not in result.stderr


def test_unloadable_model_exits_with_the_reason(tmp_path):
    server = start_server({"HF_MODEL_ID": str(tmp_path / "missing.gguf")}, tmp_path, wait=False)
    assert server.process.wait(120) != 0
    assert "HF_MODEL_ID" in server.log() and "does not exist" in server.log()
    assert "Worker failed to boot" in server.log()


def test_binds_the_sagemaker_port_and_serves(tiny_server):
    assert requests.get(f"http://127.0.0.1:{tiny_server.port}/ping", timeout=2).status_code == 200
    response = requests.post(
        tiny_server.url + "/invocations", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, timeout=30
    )
    assert response.status_code == 200 and "generated_text" in response.json()[0]
    assert "route=/invocations" in tiny_server.log() and "generated_tokens=" in tiny_server.log()
    assert "cold start: ready" in tiny_server.log()


def test_ping_stays_fast_while_generations_run(tiny_server):
    """Two long streams are generating while /ping is polled; they are closed (cancelled) once the pings are done,
    so the test costs the ping window, not 2 x 400 tokens."""
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 400, "ignore_eos": True}}
    streams = [
        requests.post(tiny_server.url + "/generate_stream", json=body, stream=True, timeout=120) for _ in range(2)
    ]
    try:
        for stream in streams:
            assert stream.status_code == 200
            assert next(line for line in stream.iter_lines() if line).startswith(b"data:")  # generating now
        slowest = 0.0
        for _ in range(10):
            started = time.monotonic()
            assert requests.get(tiny_server.url + "/ping", timeout=2).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.1)
    finally:
        for stream in streams:
            stream.close()
    assert slowest < 2.0  # SageMaker's health-check contract, not a performance target
    assert wait_for(  # the closed streams were cancelled: the next test starts on an idle engine
        lambda: "serve_batch_current_size 0.0" in requests.get(tiny_server.url + "/metrics", timeout=2).text,
        timeout=10,
    )


def test_client_disconnect_cancels_the_generation(tiny_server):
    request = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 450, "ignore_eos": True, "stream": True}
    cancelled = "outcome=cancelled reason=client_disconnected"
    before = tiny_server.log().count(cancelled)  # earlier tests may have disconnected too
    with requests.post(tiny_server.url + "/v1/chat/completions", json=request, stream=True, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(lines)
        next(lines)
    assert wait_for(lambda: tiny_server.log().count(cancelled) > before, timeout=10), tiny_server.log()[-2000:]
    assert wait_for(
        lambda: "serve_batch_current_size 0.0" in requests.get(tiny_server.url + "/metrics", timeout=2).text,
        timeout=1.0,
    )
    follow_up = requests.post(
        tiny_server.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}}, timeout=30
    )
    assert follow_up.status_code == 200


def test_bad_requests_leave_the_server_healthy(tiny_server):
    for body in (b"{", b"", b"[]", b'{"inputs": 5}', b'{"inputs": "x", "parameters": {"top_p": 2}}'):
        response = requests.post(
            tiny_server.url + "/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=10
        )
        assert 400 <= response.status_code < 500 and "error" in response.json()
    big = requests.post(tiny_server.url + "/invocations", data=b"x" * (7 * 1024 * 1024), timeout=30)
    assert big.status_code == 413
    assert requests.get(tiny_server.url + "/ping", timeout=2).status_code == 200


def test_sigterm_stops_the_server_cleanly(tiny_model_dir, tmp_path):
    server = start_server({"HF_MODEL_ID": str(tiny_model_dir)}, tmp_path)
    descendants = psutil.Process(server.process.pid).children(recursive=True)
    assert any("spawn_main" in " ".join(child.cmdline()) for child in descendants), "no engine process"
    assert server.stop(timeout=30) == 0
    _, alive = psutil.wait_procs(descendants, timeout=10)
    assert alive == [], f"left running: {alive}"


def test_a_killed_worker_takes_its_engine_process_with_it(tiny_model_dir, tmp_path):
    server = start_server({"HF_MODEL_ID": str(tiny_model_dir)}, tmp_path)
    try:
        (worker,) = psutil.Process(server.process.pid).children()
        helpers = worker.children()  # the engine process and multiprocessing's resource tracker
        assert any("spawn_main" in " ".join(child.cmdline()) for child in helpers)
        worker.kill()  # no atexit, no stop message: only the closed pipe tells the engine process
        _, alive = psutil.wait_procs(helpers, timeout=15)
        assert alive == [], "the engine process outlived its worker"
        assert wait_for(lambda: _pings(server.url), 120, 0.5)  # gunicorn's new worker, with a new engine
    finally:
        server.stop()


def _pings(url: str) -> bool:
    try:
        return requests.get(url + "/ping", timeout=2).status_code == 200
    except requests.RequestException:
        return False
