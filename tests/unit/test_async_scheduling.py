"""The host works ahead of the device (ASYNC_SCHEDULING, serve/engine/ahead.py), proven on the CPU through the
same code path a GPU runs: each step is launched before the last one's tokens are read, its rows of the sequences
the last step sampled take their tokens on the device, and every output equals the engine that reads each step
first: greedy, seeded, penalised, biased, with log-probabilities, stop strings, EOS, grammar, watermark, LoRA-free
mixed steps, preemption, prefix hits, cancels."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from serve.engine import Request, SamplingParams
from serve.engine.ahead import HostCopy, Sampled, feeds_on_device, works_ahead
from serve.engine.grammar import regex_grammar
from serve.engine.types import Watermark
from serve.wiring import single_engine

QUESTIONS = [
    "Name three colours:",
    "Count to ten:",
    "Why is the sky blue?",
    "Write a haiku about rain.",
    "What is a prime number?",
    "List the planets:",
]
CPU, CUDA = torch.device("cpu"), SimpleNamespace(type="cuda")


def seeded(tokens: int, seed: int, **more) -> SamplingParams:
    """Seeded sampling at temperature 1: the tiny random model's greedy text repeats one token, so a row fed the
    wrong token would not show; a seeded draw from the whole distribution does."""
    return SamplingParams(**({"max_new_tokens": tokens, "temperature": 1.0, "seed": seed, "ignore_eos": True} | more))


def test_auto_works_ahead_on_cuda_only_and_never_under_speculation():
    assert works_ahead("auto", CUDA, False, False).enabled
    assert not works_ahead("auto", CPU, False, False).enabled
    assert works_ahead("true", CPU, False, False).enabled
    assert not works_ahead("false", CUDA, False, False).enabled
    speculative = works_ahead("true", CUDA, True, False)
    unshared = works_ahead("auto", CUDA, False, True)
    assert not speculative.enabled and "speculative" in speculative.reason
    assert not unshared.enabled and "tensor-parallel" in unshared.reason
    assert "CPU" in works_ahead("auto", CPU, False, False).reason


def test_a_host_copy_of_a_cpu_tensor_reads_its_values():
    assert HostCopy(torch.tensor([3, -1, 7])).read() == [3, -1, 7]


def test_rows_whose_next_input_is_read_on_the_host_wait_for_it():
    plain = SimpleNamespace(matcher=None, request=SimpleNamespace(params=SamplingParams()))
    grammar = SimpleNamespace(matcher=object(), request=SimpleNamespace(params=SamplingParams()))
    marked = SimpleNamespace(matcher=None, request=SimpleNamespace(params=SamplingParams(watermark=Watermark())))
    assert feeds_on_device(plain) and not feeds_on_device(grammar) and not feeds_on_device(marked)
    first, second = object(), object()
    assert Sampled([first, second]).rows == {first: 0, second: 1}


def start(settings, ahead: bool, pad: bool = False):
    engine = single_engine(replace(settings, async_scheduling="true" if ahead else "false")).start()
    assert engine.wait_ready(120), engine.load_error
    engine._runner.static.pad = pad  # padded buckets, as a GPU runs them
    return engine


def launches(engine):
    """Record, for each launch, whether it held prompt chunks, whether a step was in flight before it, and its
    decode rows."""
    runner, log = engine._runner, []
    launch = runner.launch

    def recording(plan, pending=None):
        log.append((bool(plan.prefill), pending is not None, len(plan.decode)))
        return launch(plan, pending)

    runner.launch = recording
    return log


def outputs(engine, requests):
    """Submit the requests at once and read every stream: (tokens, text, log-probabilities, finish reason, stop
    sequence, error) per request."""
    streams = [engine.submit(request) for request in requests]
    results = []
    for stream in streams:
        events = list(stream)
        final = events[-1]
        tokens = [event.token_id for event in events if event.token_id is not None]
        logprobs = [event.logprob for event in events if event.token_id is not None]
        text = "".join(event.text for event in events)
        results.append((tokens, text, logprobs, final.finish_reason, final.stop_sequence, final.error))
    return results


def kinds(encode, eos: int):
    """One request of every row kind a step may hold (one more likely than not to end by ``eos``)."""
    prompts = [encode(question) for question in QUESTIONS]
    params = [
        SamplingParams(max_new_tokens=17, ignore_eos=True),
        SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=11, ignore_eos=True),
        SamplingParams(max_new_tokens=15, repetition_penalty=1.3, frequency_penalty=0.4, ignore_eos=True),
        SamplingParams(max_new_tokens=9, logit_bias=((5, 4.0), (7, -100.0)), ignore_eos=True),
        SamplingParams(max_new_tokens=14, logprobs=3, ignore_eos=True),
        seeded(40, 3, ignore_eos=False, logit_bias=((eos, 7.0),)),  # ends by EOS, on a token the host reads late
        SamplingParams(max_new_tokens=1, ignore_eos=True),  # ends on its first token, sampled by a prompt chunk
        SamplingParams(max_new_tokens=30, seed=5, temperature=1.0, ignore_eos=True),
    ]
    return [Request(prompt_ids=prompts[i % len(prompts)], params=p) for i, p in enumerate(params)]


@pytest.fixture(scope="module")
def encode(tiny_engine):
    return lambda text: tiny_engine.tokenizer(text)["input_ids"]


@pytest.fixture(scope="module")
def eos(tiny_engine):
    return min(tiny_engine.eos_ids)


@pytest.mark.parametrize("pad", [False, True], ids=["exact-shapes", "padded-buckets"])
def test_every_row_kind_gives_the_same_output_worked_ahead(tiny_settings, encode, eos, pad):
    results = {}
    for ahead in (False, True):
        engine = start(replace(tiny_settings, max_batch_prefill_tokens=16), ahead, pad)
        log = launches(engine)
        try:
            results[ahead] = outputs(engine, kinds(encode, eos))
            stats = engine.stats()
        finally:
            engine.stop()
        assert stats.blocks_used == 0
        if ahead:
            assert stats.steps_ahead >= 20
            ahead_kinds = {(prefill, pending) for prefill, pending, _ in log}
            assert (True, True) in ahead_kinds and (False, True) in ahead_kinds  # mixed and decode-only steps
            assert engine.describe()[0].ahead.enabled
        else:
            assert stats.steps_ahead == 0 and not any(pending for _, pending, _ in log)
    assert results[True] == results[False]
    assert [len(tokens) for tokens, *_ in results[True][:5]] == [17, 12, 15, 9, 14]
    by_eos = results[True][5]
    assert by_eos[0][-1] == eos and len(by_eos[0]) < 40 and by_eos[3].value == "stop"


def test_a_sequence_its_token_in_flight_ends_by_length_gets_no_further_row(tiny_settings, encode):
    requests = [Request(prompt_ids=encode(q), params=seeded(5 + 3 * i, i)) for i, q in enumerate(QUESTIONS)]
    rows = {}
    for ahead in (False, True):
        engine = start(tiny_settings, ahead)
        log = launches(engine)
        try:
            outputs(engine, requests)
        finally:
            engine.stop()
        rows[ahead] = sum(decode for _, _, decode in log)
    assert rows[True] == rows[False] == sum(5 + 3 * i - 1 for i in range(len(QUESTIONS)))


def test_stop_strings_and_eos_end_a_sequence_whose_next_row_already_ran(tiny_settings, encode, tiny_engine):
    requests = [Request(prompt_ids=encode(q), params=seeded(24, i)) for i, q in enumerate(QUESTIONS)]
    reference = outputs(tiny_engine, requests)
    stops = [text[3:6] for _, text, *_ in reference if len(text) > 8]  # text each answer makes mid-way
    assert stops
    requests = [
        Request(prompt_ids=encode(q), params=seeded(24, i, stop=(stop,)))
        for i, q in enumerate(QUESTIONS)
        for stop in stops[:2]
    ]
    results = {}
    for ahead in (False, True):
        engine = start(tiny_settings, ahead)
        try:
            results[ahead] = outputs(engine, requests)
            assert engine.stats().blocks_used == 0
        finally:
            engine.stop()
    assert results[True] == results[False]
    assert any(stop is not None for *_, stop, _ in results[True])


def test_grammar_and_watermark_rows_read_their_last_token_first_and_change_nothing(tiny_settings, encode, eos):
    requests = kinds(encode, eos)[:3] + [
        Request(prompt_ids=encode("Spell a word:"), params=seeded(20, 4, grammar=regex_grammar("[a-z]{5,30}"))),
        Request(prompt_ids=encode("Say hello:"), params=seeded(16, 5, watermark=Watermark())),
    ]
    results = {}
    for ahead in (False, True):
        engine = start(tiny_settings, ahead)
        try:
            results[ahead] = outputs(engine, requests)
        finally:
            engine.stop()
    assert results[True] == results[False]
    assert results[True][3][0] and results[True][3][1].isalpha()


def test_preemption_waits_for_the_tokens_in_flight_and_loses_nothing(tiny_settings, encode):
    prompts = [encode(question * 3) for question in QUESTIONS * 2]
    longest = max(len(prompt) for prompt in prompts) + 24
    settings = replace(
        tiny_settings,
        max_total_tokens=longest,
        kv_block_size=4,
        max_batch_total_tokens=3 * longest,
        max_concurrent_requests=12,
        max_batch_prefill_tokens=32,
    )
    requests = [Request(prompt_ids=p, params=seeded(24, i)) for i, p in enumerate(prompts)]
    results, stats = {}, {}
    for ahead in (False, True):
        engine = start(settings, ahead)
        try:
            results[ahead] = outputs(engine, requests)
            stats[ahead] = engine.stats()
        finally:
            engine.stop()
    assert results[True] == results[False]
    assert stats[True].preemptions > 0 and stats[True].steps_ahead > 0
    assert stats[True].blocks_used == 0


def test_prefix_hits_under_work_ahead_give_the_same_tokens(tiny_settings, encode):
    shared = encode("You are a careful assistant. Answer in one short sentence, plainly. " * 3)
    prompts = [shared + encode(question) for question in QUESTIONS]
    requests = [Request(prompt_ids=p, params=seeded(12, i)) for i, p in enumerate(prompts)]
    engine = start(replace(tiny_settings, kv_block_size=4), True)
    try:
        first = outputs(engine, requests)
        second = outputs(engine, requests)  # the prompts' blocks are now cached
        hits = engine.stats().prefix_hit_tokens
    finally:
        engine.stop()
    cold = start(replace(tiny_settings, kv_block_size=4, enable_prefix_caching=False), False)
    try:
        reference = outputs(cold, requests)
    finally:
        cold.stop()
    assert first == second == reference and hits >= len(shared) * (len(prompts) - 1)


def test_a_cancel_while_a_step_is_in_flight_ends_the_request_and_frees_its_blocks(tiny_settings, encode):
    engine = start(tiny_settings, True)
    try:
        keep = engine.submit(Request(prompt_ids=encode("Keep going:"), params=seeded(60, 1)))
        drop = engine.submit(Request(prompt_ids=encode("Stop soon:"), params=seeded(500, 2)))
        seen = []
        for event in drop:
            seen.append(event)
            if len(seen) == 5:
                engine.cancel(drop.request.id)
        assert seen[-1].finish_reason.value == "cancelled" and len(seen) < 500
        assert len([e for e in keep if e.token_id is not None]) == 60
        assert engine.stats().blocks_used == 0 and engine.in_flight == 0
    finally:
        engine.stop()
