"""The paged KV cache through the engine: preemption loses nothing, prefix-cache hits change nothing (float32)."""

from dataclasses import replace

import pytest

from serve.wiring import single_engine
from serve.engine import Request, SamplingParams

SHARED = "You are a helpful assistant. Answer briefly and precisely, in plain words. Question: "
QUESTIONS = [
    "what is two plus two?",
    "name a colour.",
    "why is the sea salty?",
    "who wrote Hamlet?",
    "what is a prime?",
    "how far is the moon?",
    "what do bees make?",
    "what is rust?",
    "why do cats purr?",
    "what is a noun?",
    "how does rain form?",
    "what is a comet?",
]


def start(settings):
    engine = single_engine(settings).start()
    assert engine.wait_ready(120), engine.load_error
    return engine


def greedy(prompt_ids, tokens=24):
    return Request(prompt_ids=prompt_ids, params=SamplingParams(max_new_tokens=tokens, ignore_eos=True))


def run_all(engine, prompts, tokens=24):
    """Submit every prompt at once (one batch), then read each stream: (token ids, final event) per prompt."""
    streams = [engine.submit(greedy(prompt, tokens)) for prompt in prompts]
    results = []
    for stream in streams:
        events = list(stream)
        results.append(([e.token_id for e in events if e.token_id is not None], events[-1]))
    return results


@pytest.fixture(scope="module")
def prompts(tiny_engine):
    encode = lambda text: tiny_engine.tokenizer(text)["input_ids"]  # noqa: E731
    return [encode(SHARED + question) for question in QUESTIONS * 2]  # 24 prompts, each twice


@pytest.fixture(scope="module")
def alone(tiny_settings, prompts):
    """Each prompt run by itself on an engine without prefix caching: the reference."""
    engine = start(replace(tiny_settings, enable_prefix_caching=False, max_concurrent_requests=1))
    try:
        return [run_all(engine, [prompt])[0][0] for prompt in prompts[: len(QUESTIONS)]] * 2
    finally:
        engine.stop()


def test_a_pool_of_four_full_sequences_serves_24_requests_by_preempting(tiny_settings, prompts, alone):
    longest = max(len(prompt) for prompt in prompts) + 24
    settings = replace(
        tiny_settings,
        max_total_tokens=longest,
        kv_block_size=4,
        max_batch_total_tokens=4 * longest,
        max_concurrent_requests=24,
        max_batch_prefill_tokens=64,
    )
    engine = start(settings)
    try:
        results = run_all(engine, prompts)
        stats = engine.stats()
    finally:
        engine.stop()
    assert [tokens for tokens, _ in results] == alone
    assert all(final.generated_tokens == 24 and final.finish_reason.value == "length" for _, final in results)
    assert stats.preemptions > 0, "the pool was large enough that nothing was preempted: the test proves nothing"
    assert stats.peak_running > 4 and stats.blocks_used == 0  # more than 4 ran at once; every block came back


def test_prefix_cache_hits_give_the_same_tokens_as_computing_the_prompt(tiny_settings, prompts, alone):
    engine = start(replace(tiny_settings, kv_block_size=4))
    try:
        first = run_all(engine, prompts[:1])[0]
        again = run_all(engine, prompts[:1])[0]  # the whole prompt but its last block is cached
        sibling = run_all(engine, prompts[1:2])[0]  # shares the system prompt: a hit that ends mid-prompt
        stats = engine.stats()
    finally:
        engine.stop()
    assert first[1].cached_tokens == 0 and first[0] == alone[0]
    assert again[1].cached_tokens == (len(prompts[0]) - 1) // 4 * 4 and again[0] == alone[0]
    shared = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1])) if a != b)
    assert sibling[1].cached_tokens == shared // 4 * 4 > 0 and sibling[0] == alone[1]
    assert stats.prefix_hit_tokens == again[1].cached_tokens + sibling[1].cached_tokens


def test_prefix_caching_off_never_reuses(tiny_settings, prompts):
    engine = start(replace(tiny_settings, enable_prefix_caching=False))
    try:
        results = run_all(engine, prompts[:1] * 2, tokens=2) + run_all(engine, prompts[:1], tokens=2)
    finally:
        engine.stop()
    assert [final.cached_tokens for _, final in results] == [0, 0, 0]


def test_a_session_keeps_its_conversation_cached_under_pressure_until_closed(tiny_settings, prompts):
    longest = max(len(prompt) for prompt in prompts) + 8
    engine = start(
        replace(tiny_settings, kv_block_size=4, max_batch_total_tokens=8 * longest, max_total_tokens=longest)
    )
    try:
        turn = Request(prompt_ids=prompts[0], params=SamplingParams(max_new_tokens=4, ignore_eos=True), session_id="s1")
        first = [event for event in engine.submit(turn)]
        history = prompts[0] + [event.token_id for event in first if event.token_id is not None]
        others = [[token + 1 + i for token in prompt] for i, prompt in enumerate(prompts[1:9])]  # nothing shared
        for half in (others[:4], others[4:]):  # fills the pool: unpinned cached blocks are evicted (running
            run_all(engine, half, tokens=8)  # sequences never lack blocks: then pins would give way to them)
        again = Request(
            prompt_ids=history + [5, 6], params=SamplingParams(max_new_tokens=2, ignore_eos=True), session_id="s1"
        )
        second = list(engine.submit(again))[-1]
        engine.close_session("s1")
        run_all(engine, others, tokens=8)
        third = list(engine.submit(Request(prompt_ids=history + [5, 6], params=SamplingParams(max_new_tokens=2))))[-1]
    finally:
        engine.stop()
    assert second.cached_tokens >= len(history) // 4 * 4 - 4  # the conversation's full blocks, kept through the load
    assert third.cached_tokens < second.cached_tokens  # closed: its blocks were evicted like any others
