"""The scheduler without a model: admission, the FIFO queue, the prefill budget, cancels, and (through the engine's
step loop with a stand-in runner) the batch cap, blocks given back, and preempted sequences resumed first."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from serve.engine.block_manager import BlockManager
from serve.engine.engine import Engine, Limits
from serve.engine.scheduler import EngineOverloaded, Scheduler
from serve.engine.sequence import Sequence
from serve.engine.types import EngineConfig, FinishReason, Request, SamplingParams, TokenChoice


class FakeTokenizer:
    """Token 7 reads "<7>": enough for the detokenizer a Sequence keeps."""

    def decode(self, ids, **_):
        return "".join(f"<{token}>" for token in ids)


def request(prompt_len: int, name: str, max_new_tokens: int = 16, first: int = 100) -> Request:
    return Request(list(range(first, first + prompt_len)), SamplingParams(max_new_tokens=max_new_tokens), id=name)


def sequence(prompt_len: int, name: str) -> Sequence:
    return Sequence(request(prompt_len, name), FakeTokenizer(), frozenset())


# --- the Scheduler alone ---------------------------------------------------------------------------------------------


def test_admission_cap_refuses_past_max_in_flight_until_a_request_finishes():
    scheduler = Scheduler(max_in_flight=2, prefill_budget=64)
    scheduler.admit(request(4, "a"))
    scheduler.admit(request(4, "b"))
    with pytest.raises(EngineOverloaded, match="2 requests in flight, the limit is 2"):
        scheduler.admit(request(4, "c"))
    assert scheduler.in_flight == 2 and scheduler.waiting == 2  # the refused one left no trace
    scheduler.pop_waiting(1)  # running now: still in flight, still counted
    with pytest.raises(EngineOverloaded):
        scheduler.admit(request(4, "c"))
    scheduler.finish("a")
    scheduler.admit(request(4, "c"))
    assert scheduler.in_flight == 2 and scheduler.waiting == 2


def test_waiting_requests_leave_in_arrival_order():
    scheduler = Scheduler(max_in_flight=8, prefill_budget=64)
    for name in "abcde":
        scheduler.admit(request(4, name))
    assert scheduler.peek_waiting().id == "a" and scheduler.waiting == 5  # peeking leaves it queued
    assert [r.id for r in scheduler.pop_waiting(2)] == ["a", "b"]
    scheduler.admit(request(4, "f"))
    assert [r.id for r in scheduler.pop_waiting(10)] == ["c", "d", "e", "f"]
    assert scheduler.pop_waiting(3) == [] and scheduler.peek_waiting() is None


def test_plan_decodes_every_prefilled_sequence_and_spends_the_prefill_budget_oldest_first():
    scheduler = Scheduler(max_in_flight=8, prefill_budget=10)
    done, old, young, last = sequence(5, "done"), sequence(6, "old"), sequence(7, "young"), sequence(3, "last")
    done.num_cached = 5
    plan = scheduler.plan([old, done, young, last])
    assert plan.decode == [done]
    assert [(seq.id, count) for seq, count in plan.prefill] == [("old", 6), ("young", 4)]  # "last" gets nothing


def test_a_long_prompt_is_prefilled_in_budget_sized_chunks_across_steps():
    scheduler = Scheduler(max_in_flight=8, prefill_budget=16)
    long, decoding = sequence(40, "long"), sequence(3, "decoding")
    decoding.num_cached = 3
    chunks = []
    while long.prompt_left:
        plan = scheduler.plan([decoding, long])
        assert plan.decode == [decoding]  # decode goes on while the long prompt is prefilled
        ((seq, count),) = plan.prefill
        chunks.append(count)
        seq.num_cached += count  # what the runner's forward pass does
    assert chunks == [16, 16, 8]
    assert scheduler.plan([decoding, long]).decode == [decoding, long]


def test_cancel_of_a_waiting_request_takes_it_out_of_the_queue():
    scheduler = Scheduler(max_in_flight=8, prefill_budget=64)
    for name in "abc":
        scheduler.admit(request(4, name))
    scheduler.cancel("b")
    scheduler.cancel("nobody")  # not in flight: ignored
    assert scheduler.is_cancelled("b") and not scheduler.is_cancelled("nobody")
    assert [r.id for r in scheduler.pop_cancelled_waiting()] == ["b"]
    assert [r.id for r in scheduler.pop_waiting(5)] == ["a", "c"]
    scheduler.finish("b")
    assert not scheduler.is_cancelled("b") and scheduler.in_flight == 2


def test_an_idle_wait_ends_when_a_request_is_admitted():
    scheduler = Scheduler(max_in_flight=8, prefill_budget=64)
    started = time.monotonic()
    scheduler.wait_for_work(timeout=0.05)  # nothing comes: waits out its timeout
    assert time.monotonic() - started >= 0.04
    threading.Timer(0.05, scheduler.admit, [request(4, "a")]).start()
    started = time.monotonic()
    scheduler.wait_for_work(timeout=5)
    assert time.monotonic() - started < 2 and scheduler.waiting == 1


# --- the engine's step loop around it, with a stand-in runner --------------------------------------------------------


class FakeRunner:
    """Does what ModelRunner.step does to the sequences (cache progress) without a model; samples 1000 + the
    number of cached tokens, so a sequence that resumes at the wrong place gets different tokens."""

    def __init__(self):
        self.plans: list[tuple[list[str], list[tuple[str, int]]]] = []
        self.forgotten: list[str] = []

    def generator_for(self, params):
        return None

    def forget(self, seq):
        self.forgotten.append(seq.id)

    def step(self, plan):
        self.plans.append(([seq.id for seq in plan.decode], [(seq.id, count) for seq, count in plan.prefill]))
        for seq in plan.decode:
            seq.num_cached += 1
        for seq, count in plan.prefill:
            seq.num_cached += count
        sampled = plan.decode + [seq for seq, _ in plan.prefill if not seq.prompt_left]
        return sampled, [TokenChoice(1000 + seq.num_cached) for seq in sampled]


def bare_engine(blocks: int, block_size: int = 4, max_batch: int = 8, max_in_flight: int = 16, budget: int = 512):
    """An Engine whose load step is replaced by a stand-in runner and a real block manager; no thread runs."""
    config = EngineConfig(max_in_flight, max_batch_prefill_tokens=budget, kv_block_size=block_size)
    engine = Engine(load=lambda: None, config=config)
    engine.loaded = SimpleNamespace(tokenizer=FakeTokenizer(), model=SimpleNamespace())
    engine.grammars = SimpleNamespace(matcher=lambda grammar: None)
    engine._blocks = BlockManager(blocks, block_size)
    engine._watermark = 0
    engine.eos_ids = frozenset()
    engine._runner = FakeRunner()
    engine.limits = Limits(256, 512, (blocks - 1) * block_size, max_batch, block_size, blocks - 1)
    engine._ready.set()
    return engine


def tick(engine: Engine) -> None:
    """One turn of the engine thread's loop."""
    engine._admit_waiting()
    engine._drop_cancelled()
    if engine._running:
        engine._step()


def running_ids(engine: Engine) -> list[str]:
    return [seq.id for seq in engine._running]


def events(stream) -> list:
    drained = []
    while not stream._events.empty():
        drained.append(stream._events.get_nowait()[1])
    return drained


def test_max_batch_size_caps_the_running_batch_and_the_rest_wait_in_order():
    engine = bare_engine(blocks=64, max_batch=2)
    for name in "abcd":
        engine.submit(request(4, name, max_new_tokens=2))
    tick(engine)
    assert running_ids(engine) == ["a", "b"] and engine.waiting == 2
    assert engine._runner.plans[0] == ([], [("a", 4), ("b", 4)])
    tick(engine)  # a and b make their second token and finish
    assert running_ids(engine) == [] and engine.in_flight == 2
    tick(engine)
    assert running_ids(engine) == ["c", "d"] and engine.waiting == 0


def test_admission_is_fifo_a_small_prompt_does_not_overtake_one_waiting_for_blocks():
    engine = bare_engine(blocks=5, block_size=4)  # 4 usable blocks
    big = engine.submit(request(12, "big", max_new_tokens=2))  # 3 blocks
    engine.submit(request(12, "bigger", max_new_tokens=4, first=300))  # 3 more: must wait for "big"
    engine.submit(request(2, "small", max_new_tokens=4, first=500))  # 1 block would fit, but it is behind "bigger"
    tick(engine)
    assert running_ids(engine) == ["big"] and engine.waiting == 2
    tick(engine)  # "big" finishes and gives its blocks back
    assert [event.finish_reason for event in events(big)][-1] is FinishReason.LENGTH
    tick(engine)
    assert running_ids(engine) == ["bigger", "small"]  # both fit now, in arrival order


def test_a_long_prompt_is_chunked_by_the_prefill_budget_while_others_decode():
    engine = bare_engine(blocks=64, budget=8)
    engine.submit(request(3, "short", max_new_tokens=6))
    engine.submit(request(20, "long", max_new_tokens=2, first=300))
    for _ in range(4):
        tick(engine)
    assert engine._runner.plans == [
        ([], [("short", 3), ("long", 5)]),  # the budget is shared, oldest first
        (["short"], [("long", 8)]),
        (["short"], [("long", 7)]),  # the last chunk: "long" samples its first token
        (["short", "long"], []),
    ]


def test_cancelling_a_running_request_ends_it_and_returns_its_blocks():
    engine = bare_engine(blocks=16)
    stream = engine.submit(request(10, "a", max_new_tokens=50))
    tick(engine)
    tick(engine)
    assert engine._blocks.used_blocks == 3 and running_ids(engine) == ["a"]
    stream.close()  # the client went away
    tick(engine)
    assert running_ids(engine) == [] and engine.in_flight == 0 and engine._runner.forgotten == ["a"]
    assert engine._blocks.used_blocks == 0 and engine._blocks.free_blocks == 15
    final = events(stream)[-1]
    assert final.finish_reason is FinishReason.CANCELLED and final.generated_tokens == 2


def test_cancelling_a_waiting_request_drops_it_before_it_gets_blocks():
    engine = bare_engine(blocks=4, max_batch=1)
    engine.submit(request(4, "running", max_new_tokens=50))
    waiting = engine.submit(request(4, "waiting", max_new_tokens=50, first=300))
    tick(engine)
    assert running_ids(engine) == ["running"] and engine.waiting == 1
    used = engine._blocks.used_blocks
    waiting.close()
    tick(engine)
    (final,) = events(waiting)
    assert final.finish_reason is FinishReason.CANCELLED and final.generated_tokens == 0
    assert engine.waiting == 0 and engine.in_flight == 1 and engine._blocks.used_blocks == used + 1  # the runner grew
    assert all("waiting" not in ids for plan in engine._runner.plans for ids in (plan[0], [n for n, _ in plan[1]]))


def test_a_full_pool_preempts_the_latest_admitted_which_resumes_before_new_requests():
    engine = bare_engine(blocks=4, block_size=4)  # 3 usable blocks
    first = engine.submit(request(4, "first", max_new_tokens=3))
    second = engine.submit(request(4, "second", max_new_tokens=3, first=300))
    tick(engine)  # both prefill (1 block each) and sample a token
    tick(engine)  # both need a 2nd block, one is free: "second", admitted last, is preempted
    assert running_ids(engine) == ["first"] and [seq.id for seq in engine._preempted] == ["second"]
    assert engine.stats().preemptions == 1 and engine._runner.forgotten == ["second"]
    assert engine._blocks.used_blocks == 2  # "second" gave its block back
    assert engine._preempted[0].prefill_ids == list(range(300, 304)) + [1004]  # recomputes its token too
    late = engine.submit(request(4, "late", max_new_tokens=1, first=500))  # would fit, but "second" comes first
    tick(engine)  # "first" makes its last token; "second" cannot have its 2 blocks yet, so "late" waits behind it
    assert running_ids(engine) == [] and [seq.id for seq in engine._preempted] == ["second"]
    assert engine.scheduler.waiting == 1 and engine._blocks.used_blocks == 0
    tick(engine)  # "second" resumes first (its cached prompt block is reused: 1 token to compute), then "late"
    assert engine._runner.plans[-1] == ([], [("second", 1), ("late", 4)])
    for _ in range(3):
        tick(engine)
    assert engine.in_flight == 0 and engine._blocks.used_blocks == 0 and not engine._preempted
    for stream in (first, second):  # the preempted one made the same tokens: none lost, none repeated
        assert [event.token_id for event in events(stream)] == [1004, 1005, 1006]
    assert [event.token_id for event in events(late)] == [1004]
