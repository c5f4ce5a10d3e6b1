"""Session bookkeeping: expiry, close, what the engine is told, and the session id on engine requests."""

from dataclasses import replace

import pytest

from serve.app import create_app
from serve.errors import BadRequest, Overloaded
from serve.sagemaker.sessions import SessionStore, session_request_type


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_sessions_close_and_expire_once_each_and_the_engine_is_told():
    clock, closed = Clock(), []
    store = SessionStore(60, closed.append, clock)
    first, expires = store.create()
    second, _ = store.create()
    assert expires == clock.now + 60 and store.check(first) == first
    store.close(first)
    assert closed == [first]
    with pytest.raises(BadRequest, match=f"session {first} is closed"):
        store.check(first)
    clock.now += 61
    store.sweep()
    store.sweep()
    assert closed == [first, second]
    with pytest.raises(BadRequest, match=f"session {second} is expired"):
        store.close(second)
    with pytest.raises(BadRequest, match="is unknown"):
        store.check("made-up")


def test_session_request_types():
    assert session_request_type({"inputs": "hi"}) is None and session_request_type(["x"]) is None
    assert session_request_type({"requestType": "NEW_SESSION"}) == "NEW_SESSION"
    for bad in ({"requestType": "new_session"}, {"requestType": None}, {"requestType": "CLOSE", "x": 1}):
        with pytest.raises(BadRequest):
            session_request_type(bad)


class Recorder:
    """The tiny engine, recording what it is asked to run and which sessions it is told to unpin."""

    def __init__(self, engine):
        self._engine, self.requests, self.closed = engine, [], []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def submit(self, request, *args, **kwargs):
        self.requests.append(request)
        return self._engine.submit(request, *args, **kwargs)

    def close_session(self, session_id):
        self.closed.append(session_id)


def test_requests_of_a_live_session_carry_its_id_and_close_unpins_it(tiny_settings, tiny_engine):
    engine = Recorder(tiny_engine)
    client = create_app(replace(tiny_settings, stateful_sessions=True), engine).test_client()
    created = client.post("/invocations", json={"requestType": "NEW_SESSION"})
    session_id = created.headers["X-Amzn-SageMaker-New-Session-Id"].split(";")[0]
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    assert (
        client.post("/invocations", json=body, headers={"X-Amzn-SageMaker-Session-Id": session_id}).status_code == 200
    )
    assert client.post("/invocations", json=body).status_code == 200
    assert [request.session_id for request in engine.requests] == [session_id, None]
    closed = client.post(
        "/invocations", json={"requestType": "CLOSE"}, headers={"X-Amzn-SageMaker-Session-Id": session_id}
    )
    assert closed.status_code == 200 and engine.closed == [session_id]


def test_past_max_sessions_the_session_idle_longest_expires_and_when_all_are_busy_it_is_a_429():
    clock, closed = Clock(), []
    store = SessionStore(60, closed.append, clock, max_sessions=2)
    first, _ = store.create()
    second, _ = store.create()
    store.check(first)  # used since: "second" is now the one idle longest
    third, _ = store.create()
    assert closed == [second] and store.live == 2
    with pytest.raises(BadRequest, match=f"session {second} is expired"):
        store.check(second)
    store.begin(first)
    store.begin(third)
    with pytest.raises(Overloaded, match="MAX_SESSIONS=2") as refused:
        store.create()
    assert refused.value.status == 429 and store.live == 2 and closed == [second]
    store.finish(third)
    store.create()
    assert closed == [second, third] and store.check(first) == first  # the busy one was kept


def test_a_session_counts_as_busy_until_its_response_is_closed(tiny_settings, tiny_engine):
    settings = replace(tiny_settings, stateful_sessions=True, max_sessions=1)
    client = create_app(settings, tiny_engine).test_client()
    created = client.post("/invocations", json={"requestType": "NEW_SESSION"})
    session_id = created.headers["X-Amzn-SageMaker-New-Session-Id"].split(";")[0]
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    answer = client.post("/invocations", json=body, headers={"X-Amzn-SageMaker-Session-Id": session_id})
    assert answer.status_code == 200
    refused = client.post("/invocations", json={"requestType": "NEW_SESSION"})
    assert refused.status_code == 429 and "MAX_SESSIONS=1" in refused.get_json()["error"]
    answer.close()  # sent: the session is idle again
    assert client.post("/invocations", json={"requestType": "NEW_SESSION"}).status_code == 200
    gone = client.post("/invocations", json=body, headers={"X-Amzn-SageMaker-Session-Id": session_id})
    assert gone.status_code == 400 and f"session {session_id} is expired" in gone.get_json()["error"]
