"""Issue 16, minor items, on one real server with two workers: /metrics aggregated over workers, no control socket
in $HOME, a short API_KEY redacted, a CHAT_TEMPLATE path holding ``{`` read as a file."""

from __future__ import annotations

import os
import re

import pytest
import requests

from tests.helpers import Server, start_server, wait_for

pytestmark = pytest.mark.e2e

SHORT_KEY = "k3y9"
REQUESTS = 6


@pytest.fixture(scope="module")
def two_workers(tiny_model_dir, tmp_path_factory) -> tuple[Server, object]:
    home = tmp_path_factory.mktemp("home")
    template = home / "chat{v2}.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    env = {
        "HF_MODEL_ID": str(tiny_model_dir),
        "SAGEMAKER_MODEL_SERVER_WORKERS": "2",
        "API_KEY": SHORT_KEY,
        "CHAT_TEMPLATE": str(template),
        "HOME": str(home),
        "LOG_LEVEL": "DEBUG",
        "SERVE_CACHE_DIR": str(home / "cache"),
    }
    saved = os.environ.pop("XDG_RUNTIME_DIR", None)
    try:
        server = start_server(env, tmp_path_factory.mktemp("two-workers"), timeout=300)
    finally:
        if saved is not None:
            os.environ["XDG_RUNTIME_DIR"] = saved
    assert wait_for(lambda: server.log().count("engine pool ready") == 2, timeout=300), server.log()[-3000:]  # both
    yield server, home
    server.stop()


def auth(key: str = SHORT_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def counter(text: str, route: str) -> float:
    match = re.search(rf'^serve_requests_total{{route="{re.escape(route)}",status="200"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def serve_ready(url: str) -> bool:
    """``serve_ready`` is 1 over every live worker (the gauge's minimum)."""
    with requests.Session() as fresh:
        text = fresh.get(url + "/metrics", headers=auth(), timeout=30).text
    return re.search(r"^serve_ready 1\.0$", text, re.MULTILINE) is not None


def test_metrics_count_every_workers_requests(two_workers):
    server, _ = two_workers
    for _ in range(REQUESTS):
        with requests.Session() as fresh:  # a new connection each: the kernel spreads them over the workers
            response = fresh.post(
                server.url + "/generate",
                json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}},
                headers=auth(),
                timeout=60,
            )
            assert response.status_code == 200, response.text
    assert wait_for(lambda: serve_ready(server.url), timeout=10)  # each worker's gauges refresh every 0.25 s
    pids = set()
    for _ in range(8):
        with requests.Session() as fresh:
            text = fresh.get(server.url + "/metrics", headers=auth(), timeout=30).text
        assert counter(text, "/generate") == REQUESTS, text[:2000]
        assert re.search(r"^serve_ready 1\.0$", text, re.MULTILINE), text[:2000]
        pids |= set(re.findall(r"\[(\d+)\] serve.request: route=/generate", server.log()))
    print(f"/generate served by worker pids {sorted(pids)}")


def test_no_control_socket_in_home(two_workers):
    _, home = two_workers
    assert not (home / ".gunicorn").exists()


def test_short_api_key_is_redacted(two_workers):
    server, _ = two_workers
    assert requests.get(server.url + "/info", headers=auth(SHORT_KEY + "x"), timeout=10).status_code == 401
    body = {"inputs": "Hi", "parameters": {"max_new_tokens": 1, "adapter_id": SHORT_KEY}}
    response = requests.post(server.url + "/generate", json=body, headers=auth(), timeout=30)
    assert response.status_code == 422 and "adapter" in response.text
    assert SHORT_KEY not in response.text, response.text
    assert re.search(rf"(?<![\w-]){SHORT_KEY}(?![\w-])", server.log()) is None


def test_chat_template_path_with_a_brace_is_read_as_a_file(two_workers):
    server, _ = two_workers
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1}
    response = requests.post(server.url + "/v1/chat/completions", json=body, headers=auth(), timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 1  # the file's template renders just "Hello", not the path
