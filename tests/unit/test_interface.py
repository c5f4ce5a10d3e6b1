"""What a client of the engine interface relies on, driven through a real pool over one real engine process of the
tiny model: limits known once ready, submit and stream, cancel, the 429 at the cap, sessions, counters."""

import queue
import time
from dataclasses import replace

import pytest

from serve.engine import EngineOverloaded, FinishReason, Request, SamplingParams
from serve.engine.grammar import GrammarError, regex_grammar
from serve.wiring import build_engine

CAP = 2


@pytest.fixture(scope="module")
def pool(tiny_settings):
    engine = build_engine(replace(tiny_settings, max_concurrent_requests=CAP))
    assert engine.limits is None and not engine.ready  # nothing known before it starts
    engine.start()
    assert engine.wait_ready(120), engine.load_error
    yield engine
    engine.stop()


def request(pool, tokens: int, session=None) -> Request:
    ids = pool.tokenizer("The capital of France is")["input_ids"]
    return Request(ids, SamplingParams(max_new_tokens=tokens, ignore_eos=True), session_id=session)


def wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_limits_model_and_tokenizer_are_known_once_ready(pool, tiny_engine):
    assert pool.limits == replace(tiny_engine.limits, max_batch_size=CAP)
    assert pool.loaded.name == tiny_engine.loaded.name
    assert pool.tokenizer("Hello")["input_ids"] == tiny_engine.tokenizer("Hello")["input_ids"]
    pool.grammars.check(regex_grammar("[a-z]+"))
    with pytest.raises(GrammarError, match="invalid regex"):
        pool.grammars.check(regex_grammar("[a-z"))


def test_a_submitted_request_streams_its_tokens_and_the_counters_move(pool):
    steps, served = pool.stats().steps, pool.describe()[0].served
    events = list(pool.submit(request(pool, 6)))
    assert [event.finish_reason for event in events] == [None] * 5 + [FinishReason.LENGTH]
    assert events[-1].generated_tokens == 6
    assert pool.describe()[0].served == served + 1 and pool.in_flight == 0
    assert wait_for(lambda: pool.stats().steps >= steps + 6)


def test_the_cap_is_a_429_and_cancelled_requests_free_their_places(pool):
    sink: queue.Queue = queue.Queue()
    streams = [pool.submit(request(pool, 400), sink, index) for index in range(CAP)]
    with pytest.raises(EngineOverloaded, match=f"the limit is {CAP}"):
        pool.submit(request(pool, 4))
    assert wait_for(lambda: pool.running + pool.waiting == CAP)
    for stream in streams:
        stream.close()
    finals = []
    while len(finals) < CAP:
        _, event = sink.get(timeout=30)
        if event.finish_reason is not None:
            finals.append(event.finish_reason)
    assert finals == [FinishReason.CANCELLED] * CAP and pool.in_flight == 0
    assert list(pool.submit(request(pool, 2)))[-1].finish_reason is FinishReason.LENGTH


def test_a_closed_session_unpins_its_cache(pool):
    list(pool.submit(request(pool, 40, session="s1")))  # two full blocks of 16 tokens
    assert wait_for(lambda: pool.stats().blocks_used > 0)  # the session's blocks stay pinned for its next turn
    pool.close_session("s1")
    assert wait_for(lambda: pool.stats().blocks_used == 0)
