"""Engine and EnginePool both implement the one engine interface the serving side uses."""

import pytest

from serve.engine.engine import Engine
from serve.engine.types import EngineLoad
from serve.engine.interface import EngineClient
from serve.engine.pool import EnginePool


def interface_members() -> set[str]:
    declared = {name for name in vars(EngineClient) if not name.startswith("_")}
    return declared | set(EngineClient.__annotations__)


def lone_engine() -> Engine:
    return Engine(load=lambda: None)


def pool_of(engines: list[Engine]) -> EnginePool:
    return EnginePool(prepare=lambda: None, plan_engines=lambda _: len(engines), make_engine=lambda _, i: engines[i])


def test_the_interface_names_what_the_serving_side_uses():
    assert {
        "submit",
        "cancel",
        "ready",
        "limits",
        "tokenizer",
        "in_flight",
        "waiting",
        "describe",
    } <= interface_members()


@pytest.mark.parametrize("make", [lone_engine, lambda: pool_of([])], ids=["engine", "pool"])
def test_engine_and_pool_implement_every_member(make):
    implementation = make()
    missing = [
        name
        for name in interface_members()
        if not hasattr(type(implementation), name) and name not in vars(implementation)
    ]
    assert missing == []


def test_a_lone_engine_is_its_own_only_copy_and_describes_itself():
    engine = lone_engine()
    assert engine.engines == [engine]
    assert engine.describe() == [EngineLoad(in_flight=0, served=0, graphs=None)]


def test_a_pool_describes_and_counts_over_its_engines():
    engines = [lone_engine(), lone_engine()]
    pool = pool_of(engines)
    pool.engines = engines  # as the pool's start-up thread sets them
    engines[1]._served = 3
    assert [load.served for load in pool.describe()] == [0, 3]
    assert (pool.in_flight, pool.waiting, pool.running) == (0, 0, 0)
