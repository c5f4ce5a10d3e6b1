"""EnginePool: a copy that fails to load fails the pool, with its reason; the pool alone decides admission (the cap
over every copy, the adapter gate) and where a session's requests go; a copy that dies is out of rotation and
restarted, until one crash too many fails the pool."""

import threading
from contextlib import contextmanager

import pytest

from serve.engine import Engine, EngineConfig, EngineNotReady, EngineOverloaded, Request, SamplingParams
from serve.engine.adapters import AdapterNotLoaded
from serve.engine.pool import EnginePool, TooManyCrashes
from serve.engine.recovery import CrashWindow, Recovery
from tests.helpers import wait_for


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
    """Just enough of an engine process for the pool's routing and supervision: counts what it admits, records
    sessions it closes; ``crash`` and ``stall`` stand for a dead and a frozen engine process."""

    def __init__(self):
        self.ready, self.load_error, self.admitted, self.closed = True, None, [], []
        self.in_flight = self.served = self.restarts = 0
        self.exited = self.stalled = False
        self.exit_error = None

    def start(self):
        return self

    def crash(self):
        self.ready, self.exited, self.exit_error = False, True, RuntimeError("the engine process exited (code -9)")

    def stall(self, stalled=True):
        self.ready, self.stalled = not stalled, stalled

    def restart(self):
        """A fresh engine process: loading (``loaded`` makes it ready)."""
        self.restarts += 1
        self.exited = False
        return True

    def loaded(self):
        self.ready = True

    def stop(self, timeout=5.0):
        self.ready = False

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


def started_pool(engines, recovery=Recovery(), failures=None):
    pool = EnginePool(
        lambda: None,
        lambda prepared: len(engines),
        lambda prepared, index: engines[index],
        recovery=recovery,
        on_load_failure=None if failures is None else failures.append,
    ).start()
    assert pool.wait_ready(10)
    return pool


def test_a_dead_copy_is_out_of_rotation_until_restarted_and_the_others_keep_serving():
    engines = [FakeEngine(), FakeEngine()]
    pool = started_pool(engines)
    engines[0].crash()
    assert pool.ready and pool.recovery_state is None  # one ready copy is enough
    for _ in range(3):
        pool.submit(Request([1], SamplingParams()))
    assert [len(engine.admitted) for engine in engines] == [0, 3]
    assert wait_for(lambda: engines[0].restarts == 1, timeout=30)  # after its backoff
    pool.submit(Request([1], SamplingParams()))  # still loading: not chosen
    engines[0].loaded()
    pool.submit(Request([1], SamplingParams()))
    assert [len(engine.admitted) for engine in engines] == [1, 4]
    pool.stop()


def test_a_lone_dead_copy_makes_the_pool_unready_while_it_restarts():
    engine = FakeEngine()
    pool = started_pool([engine])
    engine.crash()
    assert not pool.ready and pool.recovery_state == "restarting" and pool.load_error is None
    with pytest.raises(EngineNotReady, match="no copy of the model is ready \\(restarting\\)"):
        pool.submit(Request([1], SamplingParams()))
    assert wait_for(lambda: engine.restarts == 1, timeout=30)
    assert not pool.ready and pool.recovery_state == "restarting"  # reloading
    engine.loaded()
    assert pool.ready and pool.recovery_state is None
    pool.submit(Request([1], SamplingParams()))
    pool.stop()


def test_one_crash_more_than_the_window_allows_fails_the_pool():
    engine, failures = FakeEngine(), []
    pool = started_pool([engine], Recovery(max_restarts=1, window_s=600), failures)
    engine.crash()
    assert wait_for(lambda: engine.restarts == 1, timeout=30)
    engine.crash()
    assert wait_for(lambda: failures, timeout=30)
    assert isinstance(failures[0], TooManyCrashes) and pool.load_error is failures[0]
    assert "died 2 times within 600 s, more than ENGINE_MAX_RESTARTS=1" in str(failures[0])
    assert engine.restarts == 1 and not pool.ready
    with pytest.raises(EngineNotReady, match="failed to load: engine processes died 2 times"):
        pool.submit(Request([1], SamplingParams()))


def test_a_stalled_copy_is_out_of_rotation_and_a_lone_one_makes_the_pool_unready():
    engines = [FakeEngine(), FakeEngine()]
    pool = started_pool(engines)
    engines[1].stall()
    pool.submit(Request([1], SamplingParams()))
    pool.submit(Request([1], SamplingParams()))
    assert [len(engine.admitted) for engine in engines] == [2, 0] and pool.ready
    engines[0].stall()
    assert not pool.ready and pool.recovery_state == "stalled"
    engines[0].stall(False)
    assert pool.ready and engines[0].restarts == 0  # a stall is waited out, never restarted
    pool.stop()


def test_a_session_on_a_dead_copy_moves_to_a_ready_one():
    engines = [FakeEngine(), FakeEngine()]
    pool = started_pool(engines)
    pool.submit(Request([1], SamplingParams(), session_id="s1"))
    engines[0].crash()
    pool.submit(Request([1], SamplingParams(), session_id="s1"))
    pool.submit(Request([1], SamplingParams(), session_id="s1"))
    assert [len(engine.admitted) for engine in engines] == [1, 2]
    pool.stop()


def test_the_crash_window_backs_off_and_forgets_old_crashes():
    now = [0.0]
    window = CrashWindow(Recovery(max_restarts=3, window_s=100), clock=lambda: now[0])
    assert [window.crashed(), window.crashed(), window.crashed()] == [1.0, 2.0, 4.0]
    assert window.crashed() is None  # a fourth within 100 s
    now[0] = 150.0
    assert window.crashed() == 1.0 and window.recent == 1  # the others left the window


def test_a_dead_engines_counters_carry_over_and_its_gauges_do_not():
    from serve.engine.recovery import counters_only
    from serve.engine.types import EngineStats

    dead = EngineStats(
        blocks_used=7,
        preemptions=2,
        steps=40,
        speculative_proposed=12,
        speculative_accepted=9,
        speculative_lengths=(1, 0, 3),
    )
    kept = counters_only(dead)
    assert (kept.blocks_used, kept.preemptions, kept.steps) == (0, 2, 40)
    assert (kept.speculative_proposed, kept.speculative_accepted, kept.speculative_lengths) == (12, 9, (1, 0, 3))
