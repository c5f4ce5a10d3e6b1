"""The scheduler without a model: a real BlockManager and real Sequences, stepped by a stand-in runner. The queue,
the batch cap, the prefill budget, preemption and resumption, session pins, cancels, failures, and blocks given
back. What keeps anyone from starving (skip-ahead, aging, pins giving way, round-robin preemption) is in
tests/hardening/test_starvation.py, on this harness."""

from __future__ import annotations

import collections
import threading

from serve.engine.block_manager import BlockManager
from serve.engine.scheduler import Scheduler
from serve.engine.sequence import Sequence
from serve.engine.types import FinishReason, Request, SamplingParams, TokenChoice


class FakeTokenizer:
    """Token 7 reads "<7>": enough for the detokenizer a Sequence keeps."""

    def decode(self, ids, **_):
        return "".join(f"<{token}>" for token in ids)


class FakeRunner:
    """Does what ModelRunner.step does to the sequences (cache progress) without a model; samples 1000 + the
    number of cached tokens, so a sequence that resumes at the wrong place gets different tokens."""

    def __init__(self):
        self.plans: list[tuple[list[str], list[tuple[str, int]]]] = []

    def step(self, plan):
        self.plans.append(([seq.id for seq in plan.decode], [(seq.id, count) for seq, count in plan.prefill]))
        for seq in plan.decode:
            seq.num_cached += 1
        for seq, count in plan.prefill:
            seq.num_cached += count
        sampled = plan.decode + [seq for seq, _ in plan.prefill if not seq.prompt_left]
        return sampled, [TokenChoice(1000 + seq.num_cached) for seq in sampled]


class Harness:
    """A Scheduler over a real pool, a stand-in runner, and every event it produced, per request."""

    def __init__(self, blocks: int, block_size=4, max_batch=8, budget=512, fail_on=(), watermark=0, **fairness):
        """``fairness``: the scheduler's ``skip_ahead`` and ``max_overtakes``."""
        self.forgotten: list[str] = []
        self.fail_on = set(fail_on)  # request ids whose sequence cannot be made
        self.pool = BlockManager(blocks, block_size)
        self.scheduler = Scheduler(
            self.pool, max_batch, budget, self.new_sequence, self.forget, watermark=watermark, **fairness
        )
        self.runner = FakeRunner()
        self.events: dict[str, list] = collections.defaultdict(list)

    def new_sequence(self, request: Request) -> Sequence:
        if request.id in self.fail_on:
            raise ValueError("no generator for this seed")
        return Sequence(request, FakeTokenizer(), frozenset())

    def forget(self, seq: Sequence) -> None:
        self.forgotten.append(seq.id)

    def add(self, prompt_len: int, name: str, max_new_tokens: int = 16, first: int = 100, session=None) -> None:
        prompt = list(range(first, first + prompt_len))
        params = SamplingParams(max_new_tokens=max_new_tokens)
        self.scheduler.add(Request(prompt, params, id=name, session_id=session))

    def tick(self, output=None) -> None:
        """One turn of the engine loop: schedule, run (or fail with ``output``), postprocess."""
        plan = self.scheduler.schedule()
        self.record(plan.ended)
        if not plan.empty:
            self.record(self.scheduler.postprocess(plan, output if output is not None else self.runner.step(plan)))

    def record(self, events) -> None:
        for request_id, event in events:
            self.events[request_id].append(event)

    def running(self) -> list[str]:
        return [seq.id for seq in self.scheduler.running]

    def preempted(self) -> list[str]:
        return [seq.id for seq in self.scheduler.preempted]

    def final(self, name: str):
        *_, last = self.events[name]
        return last

    def tokens(self, name: str) -> list[int]:
        return [event.token_id for event in self.events[name] if event.token_id is not None]


def test_max_batch_caps_the_running_batch_and_the_rest_wait_in_order():
    run = Harness(blocks=64, max_batch=2)
    for name in "abcd":
        run.add(4, name, max_new_tokens=2)
    run.tick()
    assert run.running() == ["a", "b"] and run.scheduler.waiting == 2 and run.scheduler.in_flight == 4
    assert run.runner.plans[0] == ([], [("a", 4), ("b", 4)])
    run.tick()  # a and b make their second token and finish
    assert run.running() == [] and run.scheduler.in_flight == 2
    assert run.final("a").finish_reason is FinishReason.LENGTH and run.tokens("a") == [1004, 1005]
    run.tick()
    assert run.running() == ["c", "d"] and run.scheduler.waiting == 0 and run.scheduler.peak_running == 2


def test_a_small_prompt_starts_past_one_waiting_for_blocks_and_that_one_starts_when_they_free_up():
    run = Harness(blocks=5, block_size=4)  # 4 usable blocks
    run.add(12, "big", max_new_tokens=2)  # 3 blocks
    run.add(12, "bigger", max_new_tokens=4, first=300)  # 3 more: must wait for "big"
    run.add(2, "small", max_new_tokens=4, first=500)  # 1 block: it fits, so it need not wait behind "bigger"
    run.tick()
    assert run.running() == ["big", "small"] and run.scheduler.waiting == 1
    run.tick()  # "big" grows: "small", started in the same step and later, gives its block back; "big" finishes
    assert run.final("big").finish_reason is FinishReason.LENGTH and run.preempted() == ["small"]
    run.tick()
    assert run.running() == ["small", "bigger"]  # the preempted one resumes first, then "bigger" fits


def test_the_prefill_budget_is_shared_oldest_first_and_chunks_a_long_prompt_while_others_decode():
    run = Harness(blocks=64, budget=8)
    run.add(3, "short", max_new_tokens=6)
    run.add(20, "long", max_new_tokens=2, first=300)
    run.add(5, "late", max_new_tokens=2, first=500)
    for _ in range(4):
        run.tick()
    assert run.runner.plans == [
        ([], [("short", 3), ("long", 5)]),  # "late" gets nothing this step: the budget is spent
        (["short"], [("long", 8)]),
        (["short"], [("long", 7), ("late", 1)]),  # the last chunk: "long" samples its first token
        (["short", "long"], [("late", 4)]),
    ]


def test_a_full_pool_preempts_of_sequences_that_ran_as_long_the_most_recently_admitted():
    run = Harness(blocks=5, block_size=4)  # 4 usable blocks
    for index, name in enumerate(["a", "b", "c"]):
        run.add(4, name, max_new_tokens=5, first=100 * (index + 1))
    run.tick()  # each prefills its block and samples a token; one block is left
    run.tick()  # all three need a 2nd block: "a" takes the free one; "c", admitted last, gives its block to "b"
    assert run.running() == ["a", "b"] and run.preempted() == ["c"]
    assert run.scheduler.preemptions == 1 and run.forgotten == ["c"] and run.scheduler.waiting == 1
    assert run.pool.used_blocks == 4 and run.runner.plans[-1] == (["a", "b"], [])
    (preempted,) = run.scheduler.preempted
    assert preempted.block_table == [] and preempted.prefill_ids == [300, 301, 302, 303, 1004]  # recomputes its token


def test_preempted_sequences_resume_in_the_order_they_were_preempted():
    run = Harness(blocks=5, block_size=4)  # 4 usable blocks
    for index, name in enumerate("abcd"):
        run.add(4, name, max_new_tokens=5, first=100 * (index + 1))
    run.tick()  # the pool is full
    run.tick()  # "a" grows by preempting "d", "b" by preempting "c"
    assert run.running() == ["a", "b"] and run.preempted() == ["d", "c"] and run.scheduler.preemptions == 2


def test_new_requests_leave_the_watermark_free_while_others_run_but_an_idle_pool_is_all_theirs():
    assert Scheduler(BlockManager(1001, 4), 8, 64, Sequence).watermark == 10  # 1% of the pool
    assert Scheduler(BlockManager(9, 4), 8, 64, Sequence).watermark == 1  # at least one block
    run = Harness(blocks=4, block_size=4, watermark=1)  # 3 usable blocks
    run.add(12, "whole", max_new_tokens=1)  # all 3 blocks: nothing runs, so nothing needs room to grow
    run.tick()
    assert run.tokens("whole") == [1012]
    run.add(8, "a", max_new_tokens=5, first=300)
    run.add(4, "b", max_new_tokens=5, first=500)  # 1 block is free, but it is the running one's to grow into
    run.tick()
    assert run.running() == ["a"] and run.scheduler.waiting == 1 and run.pool.free_blocks == 1


def test_a_preempted_sequence_resumes_before_new_requests_and_loses_no_token():
    run = Harness(blocks=4, block_size=4)  # 3 usable blocks
    run.add(4, "first", max_new_tokens=3)
    run.add(4, "second", max_new_tokens=3, first=300)
    run.tick()  # both prefill (1 block each) and sample a token
    run.tick()  # both need a 2nd block, one is free: "second", admitted last, is preempted
    assert run.running() == ["first"] and run.preempted() == ["second"]
    run.add(4, "late", max_new_tokens=1, first=500)  # would fit, but "second" comes first
    run.tick()  # "first" makes its last token; "second" cannot have its 2 blocks yet, so "late" waits behind it
    assert run.running() == [] and run.preempted() == ["second"] and run.pool.used_blocks == 0
    run.tick()  # "second" resumes first (its cached prompt block is reused: 1 token to compute), then "late"
    assert run.runner.plans[-1] == ([], [("second", 1), ("late", 4)])
    for _ in range(3):
        run.tick()
    assert run.scheduler.in_flight == 0 and run.pool.used_blocks == 0 and not run.preempted()
    assert run.tokens("first") == run.tokens("second") == [1004, 1005, 1006]  # none lost, none repeated
    assert run.tokens("late") == [1004]


def test_a_finished_session_keeps_its_blocks_pinned_until_the_session_is_closed():
    run = Harness(blocks=9, block_size=4)  # 8 usable; pins may hold 4
    run.add(8, "turn", max_new_tokens=1, session="chat")  # 2 full prompt blocks, finishes after one token
    run.tick()
    assert run.final("turn").finish_reason is FinishReason.LENGTH and run.pool.pinned_blocks == 2
    run.add(20, "other", max_new_tokens=1, first=500)  # 5 blocks: the free ones are enough, the pin stays
    run.tick()
    assert run.final("other").finish_reason is FinishReason.LENGTH and run.pool.pinned_blocks == 2
    run.scheduler.close_session("chat")
    run.tick()
    assert run.pool.pinned_blocks == 0 and run.scheduler.pins_released == 0  # closed, not taken


def test_a_cancelled_or_failed_session_turn_pins_nothing():
    run = Harness(blocks=9, block_size=4)
    run.add(8, "cancelled", max_new_tokens=5, session="chat")
    run.tick()
    run.scheduler.cancel("cancelled")
    run.tick()
    run.add(8, "failed", max_new_tokens=5, first=300, session="chat")
    run.tick()
    run.tick(output=RuntimeError("device lost"))
    assert run.final("cancelled").finish_reason is FinishReason.CANCELLED
    assert run.final("failed").finish_reason is FinishReason.ERROR
    assert run.pool.pinned_blocks == 0 and run.pool.used_blocks == 0


def test_cancelling_a_waiting_request_drops_it_before_it_gets_blocks():
    run = Harness(blocks=4, max_batch=1)
    run.add(4, "running", max_new_tokens=50)
    run.add(4, "waiting", max_new_tokens=50, first=300)
    run.tick()
    assert run.running() == ["running"] and run.scheduler.waiting == 1
    run.scheduler.cancel("waiting")
    run.scheduler.cancel("nobody")  # not in flight: ignored
    run.tick()
    (final,) = run.events["waiting"]
    assert final.finish_reason is FinishReason.CANCELLED and final.generated_tokens == 0
    assert run.scheduler.waiting == 0 and run.scheduler.in_flight == 1 and run.running() == ["running"]
    assert all("waiting" not in plan[0] + [name for name, _ in plan[1]] for plan in run.runner.plans)
    assert "waiting" not in run.forgotten and "nobody" not in run.events


def test_cancelling_a_running_request_ends_it_and_returns_its_blocks():
    run = Harness(blocks=16)
    run.add(10, "a", max_new_tokens=50)
    run.tick()
    run.tick()
    assert run.pool.used_blocks == 3 and run.running() == ["a"]
    run.scheduler.cancel("a")  # the client went away
    run.tick()
    assert run.running() == [] and run.scheduler.in_flight == 0 and run.forgotten == ["a"]
    assert run.pool.used_blocks == 0 and run.pool.free_blocks == 15
    final = run.final("a")
    assert final.finish_reason is FinishReason.CANCELLED and final.generated_tokens == 2


def test_cancelling_a_preempted_request_ends_it_without_resuming():
    run = Harness(blocks=4, block_size=4)
    run.add(4, "first", max_new_tokens=6)
    run.add(4, "second", max_new_tokens=6, first=300)
    run.tick()
    run.tick()
    assert run.preempted() == ["second"]
    run.scheduler.cancel("second")
    run.tick()
    assert run.preempted() == [] and run.scheduler.waiting == 0 and run.scheduler.in_flight == 1
    final = run.final("second")
    assert final.finish_reason is FinishReason.CANCELLED and final.generated_tokens == 1
    assert run.forgotten == ["second", "second"]  # at preemption, and when it ended
    assert all("second" not in plan[0] + [name for name, _ in plan[1]] for plan in run.runner.plans[2:])


def test_finishing_frees_blocks_and_places_and_the_runner_forgets_each_sequence():
    run = Harness(blocks=32)
    for index, name in enumerate("abc"):
        run.add(6, name, max_new_tokens=3 + index, first=100 * (index + 1))
    for _ in range(5):
        run.tick()
    assert [run.final(name).finish_reason for name in "abc"] == [FinishReason.LENGTH] * 3
    assert [len(run.tokens(name)) for name in "abc"] == [3, 4, 5]
    assert run.pool.used_blocks == 0 and run.scheduler.in_flight == 0 and sorted(run.forgotten) == ["a", "b", "c"]
    assert run.pool.stats.queried_tokens == 18  # each prompt looked up once


def test_a_request_that_cannot_start_fails_alone_and_gives_its_blocks_back():
    run = Harness(blocks=16, fail_on={"bad"})
    run.add(4, "bad")
    run.add(4, "good", max_new_tokens=1, first=300)
    run.tick()
    (final,) = run.events["bad"]
    assert final.finish_reason is FinishReason.ERROR and "ValueError: no generator" in final.error
    assert run.tokens("good") == [1004] and run.scheduler.in_flight == 0 and run.pool.used_blocks == 0


def test_a_failed_step_fails_only_its_own_sequences():
    run = Harness(blocks=16, max_batch=1)
    run.add(4, "unlucky", max_new_tokens=5)
    run.add(4, "next", max_new_tokens=1, first=300)
    run.tick(output=RuntimeError("kernel fault"))
    final = run.final("unlucky")
    assert final.finish_reason is FinishReason.ERROR and final.error == "RuntimeError: kernel fault"
    assert "next" not in run.events and run.scheduler.in_flight == 1 and run.pool.used_blocks == 0
    run.tick()
    assert run.tokens("next") == [1004] and run.final("next").finish_reason is FinishReason.LENGTH


def test_a_failed_step_spares_a_running_sequence_it_did_not_include():
    run = Harness(blocks=16, budget=4)
    run.add(4, "planned", max_new_tokens=5)
    run.add(4, "unplanned", max_new_tokens=1, first=300)  # running, but the prefill budget is spent
    run.tick(output=RuntimeError("kernel fault"))
    assert run.final("planned").finish_reason is FinishReason.ERROR and run.running() == ["unplanned"]
    run.tick()
    assert run.tokens("unplanned") == [1004] and run.final("unplanned").finish_reason is FinishReason.LENGTH


def test_a_failure_while_recording_tokens_fails_the_rest_of_the_step():
    run = Harness(blocks=16)
    run.add(4, "a", max_new_tokens=1)
    run.add(4, "b", max_new_tokens=5, first=300)
    plan = run.scheduler.schedule()
    sampled, choices = run.runner.step(plan)
    run.record(run.scheduler.postprocess(plan, (sampled, choices[:1] + [None])))  # "b" gets no usable choice
    assert run.final("a").finish_reason is FinishReason.LENGTH and run.tokens("a") == [1004]
    assert run.final("b").finish_reason is FinishReason.ERROR and run.scheduler.in_flight == 0
    assert run.pool.used_blocks == 0


def test_an_idle_wait_ends_when_a_request_is_added():
    scheduler = Harness(blocks=8).scheduler
    waiter = threading.Thread(target=scheduler.wait_for_work, args=(60,))
    waiter.start()
    scheduler.add(Request([1, 2], SamplingParams(), id="a"))
    waiter.join(30)
    assert not waiter.is_alive() and scheduler.waiting == 1
