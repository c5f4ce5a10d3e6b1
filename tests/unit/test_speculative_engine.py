"""Speculative decoding through the engine on a tiny random Llama: greedy text is the same with and without it,
through batches that mix rows with and without proposals, preemption, prefix caching, stop strings and max_tokens
inside an accepted run, and log-probabilities; sampled rows keep their distribution."""

from collections import Counter
from dataclasses import replace

import pytest

from serve.engine import Request, SamplingParams
from serve.engine.speculative import Proposer
from serve.wiring import single_engine

PROMPTS = [
    "one two three one two three one two three one two",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return",
    "The cat sat on the mat. The cat sat on the mat. The cat",
    "a b c d e f g a b c d e f g a b c",
    "Copy this: red green blue yellow. Copy this: red green",
    "hello",
]


def start(settings):
    engine = single_engine(settings).start()
    assert engine.wait_ready(120), engine.load_error
    return engine


def run_all(engine, prompts, **params):
    """Submit every prompt at once, then read each stream: its events."""
    params = {"max_new_tokens": 24, "ignore_eos": True, **params}
    streams = [engine.submit(Request(prompt_ids=prompt, params=SamplingParams(**params))) for prompt in prompts]
    return [list(stream) for stream in streams]


def tokens_of(events):
    return [event.token_id for event in events if event.token_id is not None]


@pytest.fixture(scope="module")
def prompt_ids(tiny_engine):
    return [tiny_engine.tokenizer(text)["input_ids"] for text in PROMPTS]


@pytest.fixture(scope="module")
def plain(tiny_engine, prompt_ids):
    """Each prompt's greedy events without speculation (the session's engine runs with SPECULATIVE off)."""
    return run_all(tiny_engine, prompt_ids)


@pytest.fixture(scope="module")
def ngram_settings(tiny_settings):
    return replace(tiny_settings, speculative="ngram", speculative_tokens=4, speculative_ngram=2)


@pytest.fixture(scope="module")
def ngram_engine(ngram_settings):
    engine = start(ngram_settings)
    engine.scheduler.speculator.max_batch = 64  # every row proposes, whatever the batch
    yield engine
    engine.stop()


def test_verify_steps_run_over_the_fixed_decode_shape(ngram_engine, ngram_settings, prompt_ids, plain):
    """Only the prompt's step runs eagerly: every step that verifies a proposal takes the fixed decode shape (a graph's
    replay on a GPU), and /metrics counts the steps by path."""
    from serve.app import create_app

    before = ngram_engine.stats()
    (events,) = run_all(ngram_engine, prompt_ids[:1])
    stats = ngram_engine.stats()
    graphed, fixed, eager, piecewise = (now - then for now, then in zip(stats.step_paths, before.step_paths))
    assert tokens_of(events) == tokens_of(plain[0])
    assert stats.speculative_accepted > before.speculative_accepted  # proposals were verified, and some kept
    assert (graphed, eager, piecewise) == (0, 1, 0) and fixed == stats.steps - before.steps - 1 > 0
    text = create_app(ngram_settings, ngram_engine).test_client().get("/metrics").get_data(as_text=True)
    assert f'serve_engine_steps_by_path_total{{path="fixed_shape"}} {float(stats.step_paths[1])}' in text


def test_greedy_text_is_the_same_with_ngram_speculation(ngram_engine, prompt_ids, plain):
    before = ngram_engine.stats()
    results = run_all(ngram_engine, prompt_ids)
    stats = ngram_engine.stats()
    assert [tokens_of(events) for events in results] == [tokens_of(events) for events in plain]
    text = lambda runs: ["".join(event.text for event in events) for events in runs]  # noqa: E731
    assert text(results) == text(plain)
    assert stats.speculative_proposer == "ngram"
    proposed = stats.speculative_proposed - before.speculative_proposed
    assert 0 < stats.speculative_accepted - before.speculative_accepted < proposed  # some rejected, some accepted
    assert stats.steps - before.steps < 24 * len(prompt_ids)  # accepted runs saved steps
    assert sum(stats.speculative_lengths[1:]) > 0
    assert stats.blocks_used == 0  # every block, the tails of rejected tokens included, came back


def test_one_at_a_time_matches_and_prefix_cached_blocks_hold_accepted_tokens(ngram_engine, prompt_ids, plain):
    for prompt, events in zip(prompt_ids, plain):
        assert tokens_of(run_all(ngram_engine, [prompt])[0]) == tokens_of(events)
    again = run_all(ngram_engine, prompt_ids)  # prompts now hit the blocks keyed by the runs above
    assert [tokens_of(events) for events in again] == [tokens_of(events) for events in plain]
    assert any(events[-1].cached_tokens for events in again)


def test_a_stop_string_or_max_tokens_inside_an_accepted_run_ends_where_it_would_without(
    ngram_engine, tiny_engine, prompt_ids
):
    for prompt in prompt_ids[:5]:
        full = "".join(event.text for event in run_all(tiny_engine, [prompt])[0])
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        for params in ({"stop": (stop,)} if stop.strip() else {}, {"max_new_tokens": 7}):
            off, on = run_all(tiny_engine, [prompt], **params)[0], run_all(ngram_engine, [prompt], **params)[0]
            assert [(e.token_id, e.text) for e in on] == [(e.token_id, e.text) for e in off]
            assert (on[-1].finish_reason, on[-1].stop_sequence, on[-1].generated_tokens) == (
                off[-1].finish_reason,
                off[-1].stop_sequence,
                off[-1].generated_tokens,
            )


def test_logprobs_of_accepted_tokens_match_those_without(ngram_engine, tiny_engine, prompt_ids):
    off = run_all(tiny_engine, prompt_ids[:3], logprobs=2)
    on = run_all(ngram_engine, prompt_ids[:3], logprobs=2)
    for plain_events, spec_events in zip(off, on):
        assert tokens_of(spec_events) == tokens_of(plain_events)
        for a, b in zip(plain_events, spec_events):
            assert b.logprob == pytest.approx(a.logprob, abs=1e-4)
            assert [token for token, _ in b.top_logprobs] == [token for token, _ in a.top_logprobs]


def test_preemption_under_speculation_loses_nothing(ngram_settings, prompt_ids, plain):
    longest = max(len(prompt) for prompt in prompt_ids) + 24
    settings = replace(ngram_settings, max_total_tokens=longest, kv_block_size=4, max_batch_total_tokens=3 * longest)
    engine = start(settings)
    engine.scheduler.speculator.max_batch = 64
    try:
        results = run_all(engine, prompt_ids * 2)
        stats = engine.stats()
    finally:
        engine.stop()
    assert [tokens_of(events) for events in results] == [tokens_of(events) for events in plain] * 2
    assert stats.preemptions > 0 and stats.speculative_accepted > 0


class Spoiled(Proposer):
    """Proposes a known greedy continuation with every third proposed token wrong."""

    name = "spoiled"

    def __init__(self, tokens):
        self.tokens = tokens

    def propose(self, seq, k):
        guess = self.tokens[len(seq.output_ids) :][:k]
        return [token if index % 3 != 2 else token + 1 for index, token in enumerate(guess)]


def test_rejected_proposals_change_nothing_and_give_their_blocks_back(ngram_engine, prompt_ids, plain):
    speculator = ngram_engine.scheduler.speculator
    for prompt, events in zip(prompt_ids, plain):
        before = (speculator.stats.proposed, speculator.stats.accepted)
        proposer, speculator.proposer = speculator.proposer, Spoiled(tokens_of(events))
        try:
            assert tokens_of(run_all(ngram_engine, [prompt])[0]) == tokens_of(events)
        finally:
            speculator.proposer = proposer
        proposed, accepted = speculator.stats.proposed - before[0], speculator.stats.accepted - before[1]
        assert 0 < accepted < proposed
        assert ngram_engine.stats().blocks_used == 0


class Greedy(Proposer):
    """A proposer that guesses the greedy continuation (to test acceptance of sampled rows at a known guess)."""

    name = "greedy"

    def __init__(self, tokens):
        self.tokens = tokens

    def propose(self, seq, k):
        return self.tokens[len(seq.output_ids) :][:k]


def test_sampled_rows_keep_the_distribution_of_sampling_without_speculation(ngram_engine, tiny_engine, prompt_ids):
    """Three tokens at temperature 1 (top-k 2), drawn many times with the greedy guess proposed at the second, and
    without speculation: the two histograms agree (total variation under 0.12)."""
    prompt = prompt_ids[5]
    guess = tokens_of(run_all(tiny_engine, [prompt], max_new_tokens=3)[0])
    speculator = ngram_engine.scheduler.speculator
    proposer, speculator.proposer = speculator.proposer, Greedy(guess)
    before, draws = speculator.stats.accepted, 400
    params = {"max_new_tokens": 3, "temperature": 1.0, "top_k": 2}
    try:
        on = Counter(tuple(tokens_of(e)) for e in run_all(ngram_engine, [prompt] * draws, **params))
        accepted = speculator.stats.accepted - before
    finally:
        speculator.proposer = proposer
    off = Counter(tuple(tokens_of(e)) for e in run_all(tiny_engine, [prompt] * draws, **params))
    distance = sum(abs(on[key] - off[key]) for key in set(on) | set(off)) / (2 * draws)
    assert 0 < accepted < draws and len(off) > 2
    assert distance < 0.12, (on, off)


def test_metrics_count_proposed_and_accepted_tokens_and_accepted_lengths(ngram_settings, ngram_engine, prompt_ids):
    from serve.app import create_app

    run_all(ngram_engine, prompt_ids[:2])
    stats = ngram_engine.stats()
    text = create_app(ngram_settings, ngram_engine).test_client().get("/metrics").get_data(as_text=True)
    assert f'serve_speculative_proposed_tokens_total{{proposer="ngram"}} {float(stats.speculative_proposed)}' in text
    assert f'serve_speculative_accepted_tokens_total{{proposer="ngram"}} {float(stats.speculative_accepted)}' in text
    for length, count in enumerate(stats.speculative_lengths):
        assert f'serve_speculative_verifications_total{{accepted="{length}",proposer="ngram"}} {float(count)}' in text
    assert stats.speculative_accepted > 0


def test_info_says_what_speculates(ngram_settings, ngram_engine, tiny_settings, tiny_engine):
    from serve.app import create_app

    on = create_app(ngram_settings, ngram_engine).test_client().get("/info").get_json()
    off = create_app(tiny_settings, tiny_engine).test_client().get("/info").get_json()
    assert on["speculative"] == "ngram: 4 tokens proposed per step, matching the last 2 tokens"
    assert off["speculative"] == "off"


@pytest.mark.slow
def test_embedded_smollm2_greedy_is_byte_identical_with_ngram_speculation(embedded_folder):
    """The real embedded model (float32), 20 prompts, 4 running at a time (so every row may propose): the same
    tokens and text as with speculation off, and proposals were accepted."""
    from tests.unit.test_lean_model import settings_for

    off, _ = embedded_runs(settings_for(embedded_folder, max_concurrent_requests=4, speculative="off"))
    on, stats = embedded_runs(settings_for(embedded_folder, max_concurrent_requests=4, speculative="ngram"))
    assert on == off
    assert stats.speculative_accepted > 0


def embedded_runs(settings):
    """Each of the 20 embedded-model prompts' greedy (tokens, text), 48 tokens each, under ``settings``; and the
    engine's stats after them."""
    from tests.unit.test_lean_model import SMOL_PROMPTS

    engine = start(settings)
    try:
        prompts = [engine.tokenizer(text)["input_ids"] for text in SMOL_PROMPTS]
        runs = run_all(engine, prompts, max_new_tokens=48)
        return [(tokens_of(events), "".join(e.text for e in events)) for events in runs], engine.stats()
    finally:
        engine.stop()


class Known(Proposer):
    """Proposes each prompt's known greedy continuation, every third proposed token wrong."""

    name = "known"

    def __init__(self, continuations):
        self.continuations = continuations

    def propose(self, seq, k):
        return Spoiled(self.continuations[tuple(seq.request.prompt_ids)]).propose(seq, k)


def test_two_tensor_parallel_ranks_verify_proposals_as_one_does(embedded_folder, tmp_path):
    """Verification goes through the runner's one forward (each step's inputs sent to every rank): two ranks
    verifying proposals, some right and some wrong, give the tokens of one rank without speculation."""
    from transformers import AutoTokenizer

    from tests.unit.test_lean_model import TEXTS, save_random_model, settings_for
    from tests.unit.test_tensor_parallel import FAMILIES, SMALL_POOL, greedy, run_engine

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_folder))
    folder = save_random_model(FAMILIES["llama-gqa-2kv"](len(tokenizer)), tmp_path / "llama", tokenizer)
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    settings = settings_for(folder, max_batch_total_tokens=SMALL_POOL, max_concurrent_requests=4)
    off, _ = run_engine(settings, [greedy(prompts, new_tokens=24)])
    engine = start(replace(settings, tensor_parallel_size=2, speculative="ngram"))
    try:
        engine.scheduler.speculator.proposer = Known({tuple(p): tokens for p, tokens in zip(prompts, off)})
        streams = [engine.submit(request) for request in greedy(prompts, new_tokens=24)]
        on = [tokens_of(list(stream)) for stream in streams]
        stats = engine.stats()
    finally:
        engine.stop()
    assert on == off
    assert 0 < stats.speculative_accepted < stats.speculative_proposed
