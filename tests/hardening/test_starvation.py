"""Nobody starves: a request that cannot fit lets smaller ones pass (a bounded number of them), session pins give
way to work that needs their blocks, and preemption takes turns, so the longest silence of any stream stays
bounded. Counted in engine steps, never in seconds: the scheduler on its stand-in runner, then the real engine."""

from __future__ import annotations

import queue
from dataclasses import replace

from serve.engine import Request, SamplingParams
from serve.engine.types import FinishReason
from serve.wiring import single_engine
from tests.unit.test_scheduler import Harness

CLIENTS = 32
PROMPT, ANSWER = 8, 100  # tokens of each client's prompt and answer
SILENCE_BOUND = 2 * (PROMPT + ANSWER)  # steps: two whole generations back to back (the old policy: 317 here)


class TimedHarness(Harness):
    """The scheduler harness, noting the step of every token each request receives."""

    def __init__(self, blocks: int, **kwargs):
        super().__init__(blocks, **kwargs)
        self.steps = 0
        self.token_steps: dict[str, list[int]] = {}

    def tick(self, output=None) -> None:
        self.steps += 1
        super().tick(output)

    def record(self, events) -> None:
        super().record(events)
        for request_id, event in events:
            if event.token_id is not None:
                self.token_steps.setdefault(request_id, []).append(self.steps)

    def run_to_the_end(self, limit: int = 10_000) -> None:
        while self.scheduler.in_flight:
            assert self.steps < limit, "the requests never all finished"
            self.tick()


def longest_silence(token_steps: dict[str, list[int]]) -> int:
    """The most steps any stream went between two of its tokens."""
    return max(later - earlier for steps in token_steps.values() for earlier, later in zip(steps, steps[1:]))


def test_a_request_that_cannot_fit_is_passed_a_bounded_number_of_times_then_served():
    run = TimedHarness(blocks=9, max_overtakes=2)  # 8 usable blocks of 4 tokens
    run.add(16, "hog", max_new_tokens=3)  # 4 blocks, 5 once it grows
    run.add(20, "big", max_new_tokens=1, first=300)  # 5 blocks: not while "hog" runs
    for index in range(4):
        run.add(2, f"small{index}", max_new_tokens=1, first=500 + 10 * index)  # 1 block each
    run.tick()
    assert run.tokens("small0") and run.tokens("small1")  # two pass "big" (and finish); then it has aged
    run.tick()
    assert run.running() == ["hog"] and run.scheduler.waiting == 3  # "small2" would fit, but "big" comes first
    run.run_to_the_end()
    assert [run.token_steps[name] for name in ("big", "small2", "small3")] == [[4], [4], [4]]
    assert all(run.final(name).finish_reason is FinishReason.LENGTH for name in run.events)


def test_a_stuck_head_never_stops_the_queue_while_the_bound_is_not_reached():
    run = TimedHarness(blocks=9)  # 8 usable
    run.add(16, "hog", max_new_tokens=12)  # 4 blocks, growing to 7
    run.add(32, "whole", max_new_tokens=1, first=300)  # every block: only once "hog" is done
    for index in range(6):
        run.add(3, f"chat{index}", max_new_tokens=1, first=500 + 10 * index)
    run.tick()
    run.tick()
    assert all(run.tokens(f"chat{index}") for index in range(4))  # served beside "hog", past "whole"
    run.run_to_the_end()
    assert run.tokens("whole") and run.final("whole").finish_reason is FinishReason.LENGTH


def test_session_pins_give_way_oldest_first_to_a_request_that_could_not_start_otherwise():
    run = TimedHarness(blocks=17)  # 16 usable; pins may hold 8
    for index, session in enumerate(["old", "middle", "new"]):
        run.add(8, f"turn-{session}", max_new_tokens=1, first=100 * (index + 1), session=session)  # 2 blocks each
        run.tick()
    assert run.pool.pinned_blocks == 6 and run.pool.free_blocks == 10
    run.add(52, "long", max_new_tokens=1, first=900)  # 13 blocks: two sessions must let go, the oldest first
    run.add(2, "short", max_new_tokens=1, first=990)
    run.tick()
    assert run.tokens("long") and run.tokens("short") and run.scheduler.pins_released == 2
    assert run.pool.pinned_blocks == 2  # "new" kept its conversation
    run.add(8, "again", max_new_tokens=1, first=300, session="new")
    run.tick()
    assert run.final("again").cached_tokens == 4  # its pinned block was still there for its next turn


def test_session_pins_give_way_to_a_running_sequence_instead_of_stalling_it():
    run = TimedHarness(blocks=9)  # 8 usable; pins may hold 4
    for index, session in enumerate(["a", "b"]):
        run.add(8, f"turn-{session}", max_new_tokens=1, first=100 * (index + 1), session=session)
        run.tick()
    assert run.pool.pinned_blocks == 4
    run.add(8, "writer", max_new_tokens=12, first=500)  # 2 blocks to start, 5 at its end: pins must give way
    run.run_to_the_end()
    assert len(run.tokens("writer")) == 12 and run.scheduler.preemptions == 0
    assert run.scheduler.pins_released == 1 and run.pool.pinned_blocks == 2  # one session was enough


def test_pins_stay_when_releasing_them_would_not_make_room():
    run = TimedHarness(blocks=9)  # 8 usable
    run.add(8, "turn", max_new_tokens=1, session="chat")  # pins 2 blocks
    run.tick()
    run.add(10, "hog", max_new_tokens=2, first=300)  # 3 blocks, never more
    run.add(24, "big", max_new_tokens=1, first=500)  # 6 blocks: 3 are free, and 5 would be without the pin
    run.tick()
    assert run.running() == ["hog"] and run.pool.pinned_blocks == 2
    run.run_to_the_end()
    assert run.tokens("big") and run.scheduler.pins_released == 0 and run.pool.pinned_blocks == 2


def test_thirty_two_clients_through_a_pool_of_four_sequences_take_turns():
    full = -(-(PROMPT + ANSWER) // 4)  # blocks of one sequence at its full length
    run = TimedHarness(blocks=4 * full + 1, max_batch=CLIENTS, budget=64, watermark=1)
    for index in range(CLIENTS):
        run.add(PROMPT, f"client{index}", max_new_tokens=ANSWER, first=1000 * (index + 1))
    run.run_to_the_end()
    assert all(len(run.tokens(f"client{index}")) == ANSWER for index in range(CLIENTS))
    assert run.scheduler.preemptions > CLIENTS  # the pool was really contended
    assert longest_silence(run.token_steps) <= SILENCE_BOUND


def test_the_engine_keeps_every_stream_of_32_clients_moving_through_a_small_pool(tiny_settings):
    tokens, prompt_len = ANSWER, PROMPT
    longest = prompt_len + tokens
    settings = replace(
        tiny_settings,
        max_total_tokens=longest,
        kv_block_size=4,
        max_batch_total_tokens=4 * longest,  # a pool of a few full sequences
        max_concurrent_requests=CLIENTS,
        max_batch_prefill_tokens=64,
    )
    engine = single_engine(settings).start()
    assert engine.wait_ready(120), engine.load_error
    try:
        steps = StepSink(engine)
        params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
        for index in range(CLIENTS):
            prompt = [(7 * index + position) % 400 + 10 for position in range(prompt_len)]
            engine.submit(Request(prompt, params, id=f"client{index}"), steps, index)
        finals = steps.wait_for(CLIENTS)
        preemptions = engine.stats().preemptions
    finally:
        engine.stop()
    assert all(final.generated_tokens == tokens and final.finish_reason is FinishReason.LENGTH for final in finals)
    assert preemptions > CLIENTS
    assert longest_silence(steps.token_steps) <= SILENCE_BOUND


class StepSink(queue.Queue):
    """The events of many requests, each token stamped with the engine step that made it (on the engine thread)."""

    def __init__(self, engine):
        super().__init__()
        self._engine = engine
        self.token_steps: dict[int, list[int]] = {}

    def put(self, item, block=True, timeout=None):
        index, event = item
        if event.token_id is not None:
            self.token_steps.setdefault(index, []).append(self._engine.stats().steps)  # steps done before this one
        super().put(item, block, timeout)

    def wait_for(self, count: int) -> list:
        finals = []
        while len(finals) < count:
            _, event = self.get(timeout=300)
            if event.finish_reason is not None:
                finals.append(event)
        return finals
