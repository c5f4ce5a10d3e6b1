"""SageMaker stateful sessions and the invocation deadline, through the real entrypoint and gunicorn."""

import re
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pytest
import requests

from tests.helpers import sse_data, start_server

pytestmark = pytest.mark.e2e

SESSION = "X-Amzn-SageMaker-Session-Id"
NEW_SESSION = "X-Amzn-SageMaker-New-Session-Id"
CLOSED = "X-Amzn-SageMaker-Closed-Session-Id"
ASK = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 4}}


@pytest.fixture(scope="module")
def server(slow_model_dir, tmp_path_factory):
    env = {
        "HF_MODEL_ID": str(slow_model_dir),  # 480 tokens take longer than the 2 s to the cut on any host
        "SAGEMAKER_ENABLE_STATEFUL_SESSIONS": "true",
        "DTYPE": "float32",
        "SAGEMAKER_SESSIONS_EXPIRATION": "2",
        "INVOCATION_TIMEOUT": "3",
        "INVOCATION_TIMEOUT_MARGIN": "1",
    }
    server = start_server(env, tmp_path_factory.mktemp("logs"))
    yield server
    server.stop()


def invoke(server, body, session: str = None) -> requests.Response:
    headers = {SESSION: session} if session else {}
    return requests.post(server.url + "/invocations", json=body, headers=headers, timeout=60)


def new_session(server) -> tuple[str, datetime]:
    response = invoke(server, {"requestType": "NEW_SESSION"})
    assert response.status_code == 200, response.text
    match = re.fullmatch(r"([0-9a-f-]{36}); Expires=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)", response.headers[NEW_SESSION])
    assert match, response.headers[NEW_SESSION]
    return match[1], datetime.strptime(match[2], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)


def test_new_session_use_close(server):
    session_id, expires = new_session(server)
    assert abs((expires - datetime.now(timezone.utc)).total_seconds() - 2) < 2
    answer = invoke(server, ASK, session_id)
    assert answer.status_code == 200 and answer.json()[0]["generated_text"]
    closed = invoke(server, {"requestType": "CLOSE"}, session_id)
    assert closed.status_code == 200 and closed.headers[CLOSED] == session_id
    again = invoke(server, ASK, session_id)
    assert again.status_code == 400 and f"session {session_id} is closed" in again.json()["error"]
    assert invoke(server, {"requestType": "CLOSE"}, session_id).status_code == 400


def test_sessions_expire_on_their_own(server):
    session_id, _ = new_session(server)
    time.sleep(3)
    assert f"session {session_id} expired" in server.log()  # the sweeper ended it with no request arriving
    response = invoke(server, ASK, session_id)
    assert response.status_code == 400 and f"session {session_id} is expired" in response.json()["error"]


def test_bad_session_requests_are_400s(server, tiny_server):
    plain_server = tiny_server  # sessions not enabled
    cases = [
        (server, {"requestType": "OPEN"}, None, "requestType: must be 'NEW_SESSION' or 'CLOSE'"),
        (server, {"requestType": "NEW_SESSION", "inputs": "hi"}, None, "carries no other fields (got inputs)"),
        (server, {"requestType": "CLOSE"}, None, f"{SESSION}: closing a session needs its id"),
        (server, ASK, "no-such-session", "session 'no-such-session' is unknown"),
        (plain_server, {"requestType": "NEW_SESSION"}, None, "SAGEMAKER_ENABLE_STATEFUL_SESSIONS=true"),
        (plain_server, ASK, "some-id", "stateful sessions are not enabled"),
    ]
    for target, body, session, message in cases:
        response = invoke(target, body, session)
        assert response.status_code == 400 and message in response.json()["error"], (body, response.text)


def test_a_long_invocation_returns_its_text_at_the_deadline(server):
    started = time.monotonic()
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 480, "ignore_eos": True, "details": True}}
    response = invoke(server, body)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    details = response.json()[0]["details"]
    assert response.headers["X-Finish-Reason"] == "deadline" and details["finish_reason"] == "length"
    assert 0 < details["generated_tokens"] < 480 and response.json()[0]["generated_text"]
    assert elapsed < 3  # SageMaker's cut would have come at INVOCATION_TIMEOUT
    chat = invoke(
        server, {"messages": [{"role": "user", "content": "Tell a story"}], "max_tokens": 400, "ignore_eos": True}
    )
    assert chat.status_code == 200, chat.text
    assert chat.headers["X-Finish-Reason"] == "deadline" and chat.json()["choices"][0]["finish_reason"] == "length"
    assert 0 < chat.json()["usage"]["completion_tokens"] < 400 and chat.json()["choices"][0]["message"]["content"]


def test_short_answers_and_streams_are_not_cut(server):
    short = invoke(server, ASK)
    assert short.status_code == 200 and "X-Finish-Reason" not in short.headers
    body = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 480, "ignore_eos": True}, "stream": True}

    def timed(route: str, payload: dict) -> tuple[requests.Response, float]:
        started = time.monotonic()
        response = requests.post(server.url + route, json=payload, timeout=120)
        return response, time.monotonic() - started

    with ThreadPoolExecutor(2) as pool:  # both run past the cut at once, in one batch: the test waits for one
        streamed = pool.submit(timed, "/invocations", body)
        generated = pool.submit(timed, "/generate", {**body, "stream": False})
        (stream, stream_seconds), (direct, direct_seconds) = streamed.result(), generated.result()
    events = sse_data(stream.text)
    assert '"index":480' in events[-1].replace(" ", "") and stream_seconds > 2  # past the cut
    assert direct.status_code == 200 and "X-Finish-Reason" not in direct.headers  # only /invocations has the cut
    assert direct.json()["generated_text"] and direct_seconds > 2


@pytest.fixture(scope="module")
def capped_server(slow_model_dir, tmp_path_factory):
    env = {
        "HF_MODEL_ID": str(slow_model_dir),  # a 480-token stream outlasts the few requests made while it runs
        "SAGEMAKER_ENABLE_STATEFUL_SESSIONS": "true",
        "DTYPE": "float32",
        "MAX_SESSIONS": "2",
    }
    server = start_server(env, tmp_path_factory.mktemp("capped-logs"))
    yield server
    server.stop()


def test_live_sessions_are_capped_idle_ones_make_room_and_busy_ones_are_kept(capped_server):
    first, _ = new_session(capped_server)
    second, _ = new_session(capped_server)
    long = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 480, "ignore_eos": True}, "stream": True}

    def busy(session: str) -> requests.Response:
        """A stream of the session that has begun (its headers are in) and goes on for seconds."""
        response = requests.post(
            capped_server.url + "/invocations", json=long, headers={SESSION: session}, stream=True, timeout=60
        )
        assert response.status_code == 200, response.text
        return response

    with busy(second):
        third, _ = new_session(capped_server)  # "first" is idle: it expires to make room
        with busy(third):
            refused = invoke(capped_server, {"requestType": "NEW_SESSION"})
    assert refused.status_code == 429 and "MAX_SESSIONS=2" in refused.json()["error"], refused.text
    assert refused.json()["error_type"] == "overloaded"
    gone = invoke(capped_server, ASK, first)
    assert gone.status_code == 400 and f"session {first} is expired" in gone.json()["error"]
    assert invoke(capped_server, ASK, second).status_code == 200  # kept while busy, and still live
