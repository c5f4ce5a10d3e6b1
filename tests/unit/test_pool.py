"""EnginePool: a copy that fails to load fails the pool, with its reason; the pool alone decides admission (the cap
over every copy, the adapter gate) and where a session's requests go."""

import threading
from contextlib import contextmanager

import pytest

from serve.engine import Engine, EngineConfig, EngineNotReady, EngineOverloaded, Request, SamplingParams
from serve.engine.adapters import AdapterNotLoaded
from serve.engine.pool import EnginePool


def failing_load():
    raise RuntimeError("CUDA out of memory on cuda:1")


def test_one_failing_copy_fails_the_pool_with_its_reason():
    failures: list[BaseException] = []
    reported = threading.Event()
    plans: list[int] = []

    def make_engine(prepared, index):
        plans.append(index)
        return Engine(load=failing_load if index == 1 else (lambda: threading.Event().wait(30)), config=EngineConfig())

    pool = EnginePool(
        prepare=lambda: "prepared",
        plan_engines=lambda prepared: 2,
        make_engine=make_engine,
        on_load_failure=lambda exc: (failures.append(exc), reported.set()),
    ).start()
    assert reported.wait(30)
    assert plans == [0, 1] and str(failures[0]) == "CUDA out of memory on cuda:1"
    assert not pool.ready and pool.load_error is failures[0]
    with pytest.raises(EngineNotReady, match="failed to load: CUDA out of memory on cuda:1"):
        pool.submit(Request([1, 2], SamplingParams()))
    pool.stop(timeout=0.1)


def test_a_failing_plan_fails_the_pool():
    reported = threading.Event()

    def prepare():
        raise ValueError("the model needs 140 GiB, more than the 86.4 GiB usable on 4 GPU(s)")

    pool = EnginePool(
        prepare, lambda prepared: 1, lambda prepared, index: None, on_load_failure=lambda exc: reported.set()
    ).start()
    assert reported.wait(10) and "86.4 GiB usable" in str(pool.load_error) and pool.engines == []


class FakeEngine:
    """Just enough of an Engine for the pool's routing: counts what it admits, records sessions it closes."""

    def __init__(self):
        self.ready, self.load_error, self.admitted, self.closed = True, None, [], []
        self.in_flight = self.served = 0

    def start(self):
        return self

    def wait_ready(self, timeout=None):
        return True

    def submit(self, request, sink=None, index=0):
        self.admitted.append(request)
        self.in_flight += 1
        self.served += 1
        return request.id

    def close_session(self, session_id):
        self.closed.append(session_id)


def test_a_sessions_requests_stay_on_one_engine_until_it_closes():
    engines = [FakeEngine(), FakeEngine()]
    pool = EnginePool(lambda: None, lambda prepared: 2, lambda prepared, index: engines[index]).start()
    assert pool.wait_ready(10)
    for _ in range(3):  # least-loaded would alternate; the session keeps its engine
        pool.submit(Request([1], SamplingParams(), session_id="s1"))
    pool.submit(Request([1], SamplingParams()))
    assert [len(engine.admitted) for engine in engines] == [3, 1]
    pool.close_session("s1")
    assert engines[0].closed == engines[1].closed == ["s1"]
    pool.submit(Request([1], SamplingParams(), session_id="s1"))  # a closed id is free to land anywhere
    assert [len(engine.admitted) for engine in engines] == [3, 2]


def test_the_pool_alone_refuses_past_its_cap_over_every_copy():
    engines = [FakeEngine(), FakeEngine()]
    pool = EnginePool(
        lambda: None,
        lambda prepared: 2,
        lambda prepared, index: engines[index],
        EngineConfig(max_concurrent_requests=3),
    ).start()
    assert pool.wait_ready(10)
    for _ in range(3):
        pool.submit(Request([1], SamplingParams()))
    with pytest.raises(EngineOverloaded, match="3 requests in flight, the limit is 3"):
        pool.submit(Request([1], SamplingParams()))
    assert [len(engine.admitted) for engine in engines] == [2, 1]


def test_requests_naming_an_adapter_pass_the_registrys_gate():
    engines = [FakeEngine()]
    gated: list[str] = []

    @contextmanager
    def gate(name):
        gated.append(name)
        if name != "sql":
            raise AdapterNotLoaded(f"adapter {name!r} is not loaded")
        yield

    pool = EnginePool(lambda: None, lambda prepared: 1, lambda prepared, index: engines[index]).start()
    assert pool.wait_ready(10)
    pool.gate_adapters(gate)
    pool.submit(Request([1], SamplingParams(), adapter="sql"))
    pool.submit(Request([1], SamplingParams()))
    with pytest.raises(AdapterNotLoaded, match="adapter 'chat' is not loaded"):
        pool.submit(Request([1], SamplingParams(), adapter="chat"))
    assert gated == ["sql", "chat"] and len(engines[0].admitted) == 2
