"""SPECULATIVE=draft:<path> on tiny random Llamas built here, loaded through the real loader: greedy tokens and text
are the same as without speculation, in batches and through preemption; the target as its own draft has every
proposal accepted (its draft cache is right); the draft's cache mirrors the target's blocks; a draft of another
vocabulary, or under tensor parallelism, is refused at load."""

from dataclasses import replace
from types import SimpleNamespace

import pytest

from serve.engine import Request, SamplingParams
from serve.wiring import single_engine
from tests.helpers import build_tiny_llama

PROMPTS = [
    "one two three one two three one two",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):",
    "The cat sat on the mat. The cat sat",
    "a b c d e f g a b c",
    "Copy this: red green blue. Copy this:",
    "hello",
    "lorem ipsum dolor sit amet",
    "x",
]
NEW_TOKENS = 20


def start(settings):
    engine = single_engine(settings).start()
    assert engine.wait_ready(120), engine.load_error
    engine.scheduler.speculator.max_batch = 64  # every row proposes, whatever the batch
    return engine


def results_and_stats(settings, prompts, run=None):
    """Start an engine on ``settings``, run every prompt through ``run`` (default ``run_all``), stop it: (the
    results, the engine's stats after them)."""
    engine = start(settings)
    try:
        results = (run or run_all)(engine, prompts)
        return results, engine.stats()
    finally:
        engine.stop()


def run_all(engine, prompts):
    """Submit every prompt at once (greedy), then read each stream: its (token, text) pairs (an engine silent for a
    minute fails the test rather than hanging it)."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    streams = [engine.submit(Request(prompt_ids=prompt, params=params)) for prompt in prompts]
    pairs = lambda events: [(event.token_id, event.text) for event in events if event.token_id is not None]  # noqa: E731
    return [pairs(read(stream)) for stream in streams]


def read(stream, silence=60):
    """A stream's events, failing after ``silence`` seconds without one."""
    events = []
    for event in stream.events(heartbeat=1.0):
        silence = silence if event is not None else silence - 1
        assert silence > 0, "the engine stopped answering"
        events += [event] if event is not None else []
    return events


@pytest.fixture(scope="module")
def prompt_ids(tiny_engine):
    return [tiny_engine.tokenizer(text)["input_ids"] for text in PROMPTS]


@pytest.fixture(scope="module")
def plain(tiny_engine, prompt_ids):
    """Each prompt's greedy tokens and text without speculation (the session's engine runs with SPECULATIVE off)."""
    return run_all(tiny_engine, prompt_ids)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory, embedded_folder):
    """A smaller random Llama of the same tokenizer (one layer, hidden 32): another cache shape than the target's."""
    return build_tiny_llama(tmp_path_factory.mktemp("draft-llama"), embedded_folder, layers=1, hidden=32, seed=1)


def with_draft(settings, folder):
    return replace(settings, speculative="draft", speculative_draft=str(folder), speculative_tokens=4)


@pytest.fixture(scope="module")
def self_draft_engine(tiny_settings, tiny_model_dir):
    """The target proposing for itself: its greedy tokens are the draft's, so every proposal is accepted."""
    engine = start(with_draft(tiny_settings, tiny_model_dir))
    yield engine
    engine.stop()


def test_greedy_output_is_the_same_with_a_smaller_draft_model(tiny_settings, draft_dir, prompt_ids, plain):
    engine = start(with_draft(tiny_settings, draft_dir))
    try:
        results = run_all(engine, prompt_ids)
        stats = engine.stats()
        proposer, target = engine.scheduler.speculator.proposer, engine._runner.cache
    finally:
        engine.stop()
    assert results == plain
    assert stats.speculative_proposer == "draft" and stats.speculative_proposed > 0
    assert stats.blocks_used == 0  # every block, the tails of rejected tokens included, came back
    assert (proposer.cache.num_blocks, proposer.cache.block_size) == (target.num_blocks, target.block_size)
    assert proposer.cache.shape.layers == 1 and proposer.cache.shape != target.shape


def test_the_target_as_its_own_draft_has_every_proposal_accepted(self_draft_engine, prompt_ids, plain):
    before = self_draft_engine.stats()
    assert run_all(self_draft_engine, prompt_ids) == plain
    stats = self_draft_engine.stats()
    proposed = stats.speculative_proposed - before.speculative_proposed
    assert proposed > 0 and stats.speculative_accepted - before.speculative_accepted == proposed
    assert stats.steps - before.steps < NEW_TOKENS * len(prompt_ids) / 2  # accepted runs saved steps
    assert self_draft_engine.scheduler.speculator.proposer._cached == {}  # finished sequences are forgotten


def test_one_at_a_time_after_the_prefix_cache_filled_every_proposal_is_still_accepted(
    self_draft_engine, prompt_ids, plain
):
    """Prompts whose blocks the prefix cache holds: the draft computes their keys and values itself."""
    before = self_draft_engine.stats()
    for prompt, expected in zip(prompt_ids[:3], plain):
        assert run_all(self_draft_engine, [prompt]) == [expected]
    stats = self_draft_engine.stats()
    assert stats.prefix_hit_tokens > before.prefix_hit_tokens
    proposed = stats.speculative_proposed - before.speculative_proposed
    assert proposed > 0 and stats.speculative_accepted - before.speculative_accepted == proposed


def test_preemption_loses_nothing_and_the_draft_starts_the_resumed_sequence_afresh(
    tiny_settings, tiny_model_dir, prompt_ids, plain
):
    longest = max(len(prompt) for prompt in prompt_ids) + NEW_TOKENS
    small = replace(tiny_settings, max_total_tokens=longest, kv_block_size=4, max_batch_total_tokens=3 * longest)
    results, stats = results_and_stats(with_draft(small, tiny_model_dir), prompt_ids * 2)
    assert results == plain * 2
    assert stats.preemptions > 0
    assert stats.speculative_proposed > 0 and stats.speculative_accepted == stats.speculative_proposed


def test_info_and_metrics_name_the_draft(tiny_settings, tiny_model_dir, self_draft_engine, prompt_ids):
    from serve.app import create_app

    settings = with_draft(tiny_settings, tiny_model_dir)
    run_all(self_draft_engine, prompt_ids[:1])
    client = create_app(settings, self_draft_engine).test_client()
    described = client.get("/info").get_json()["speculative"]
    assert described == f"draft ({tiny_model_dir}): 4 tokens proposed per step, the draft model's greedy tokens"
    accepted = float(self_draft_engine.stats().speculative_accepted)
    text = client.get("/metrics").get_data(as_text=True)
    assert f'serve_speculative_accepted_tokens_total{{proposer="draft"}} {accepted}' in text


def test_a_draft_of_another_vocabulary_is_refused_at_load(tiny_settings, tmp_path, embedded_folder):
    from transformers import AutoTokenizer

    from serve.loading.loader import load_model
    from serve.loading.source import ModelLoadError

    folder = build_tiny_llama(tmp_path / "other", embedded_folder, layers=1, hidden=32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.add_tokens(["<not-in-the-target>"])
    tokenizer.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="the draft's vocabulary|tokenizer's vocabulary differs") as raised:
        load_model(with_draft(tiny_settings, folder))
    assert f"SPECULATIVE=draft:{folder}" in str(raised.value) and "1 entries not in both" in str(raised.value)


def test_a_draft_with_more_output_rows_than_the_target_has_inputs_is_refused():
    from serve.loading.draft import vocabulary_mismatch

    tokenizer = SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1})

    def model(rows):
        return SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=rows)))

    assert vocabulary_mismatch(model(64), tokenizer, model(64), tokenizer) is None
    assert vocabulary_mismatch(model(64), tokenizer, model(32), tokenizer) is None  # padding rows the draft lacks
    assert vocabulary_mismatch(model(64), tokenizer, model(80), tokenizer) == (
        "its model's vocabulary size (80) exceeds the target's (64)"
    )


def test_a_draft_under_tensor_parallelism_is_refused(tiny_settings):
    from serve.loading.draft import refuse_draft_with_tensor_parallel
    from serve.loading.source import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not run under tensor parallelism yet \\(2 ranks per copy\\)"):
        refuse_draft_with_tensor_parallel(with_draft(tiny_settings, "/some/draft"), 2)
    refuse_draft_with_tensor_parallel(with_draft(tiny_settings, "/some/draft"), 1)
    refuse_draft_with_tensor_parallel(replace(tiny_settings, speculative="ngram"), 2)


def test_the_draft_cache_comes_out_of_the_targets_memory_budget():
    import torch

    from serve.engine.draft import target_share
    from serve.engine.kv_cache import CacheShape

    target = CacheShape(layers=4, kv_heads=2, head_dim=16, dtype=torch.float32)
    draft = SimpleNamespace(
        config=SimpleNamespace(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, hidden_size=32)
    )
    assert target_share(target, None, torch.float32) == 1.0
    assert target_share(target, draft, torch.float32) == pytest.approx(4 * 2 * 16 / (4 * 2 * 16 + 1 * 2 * 16))


def drafters(engine, count):
    """``count`` draft proposers over the engine's draft model, each with a fresh cache of 24 blocks of 4."""
    import torch

    from serve.engine.draft import DraftProposer, draft_shape
    from serve.engine.kv_cache import PagedKVCache

    model = engine.loaded.draft
    shape = draft_shape(model, torch.float32)
    return [DraftProposer(model, PagedKVCache(shape, 24, 4, model.device)) for _ in range(count)]


def decoding(tokens, table):
    """A decoding sequence whose last token is not cached yet."""
    return SimpleNamespace(id="row", all_ids=list(tokens), num_cached=len(tokens) - 1, block_table=list(table))


def assert_same_draft_cache(drafter, fresh, seq):
    """The draft's keys of every position the sequence's blocks hold equal those a fresh draft computed."""
    rows = [seq.block_table[p // 4] * 4 + p % 4 for p in range(seq.num_cached + 1)]
    for layer in range(drafter.cache.shape.layers):
        mine, theirs = (d.cache.keys[layer].flatten(0, 1)[rows] for d in (drafter, fresh))
        assert (mine - theirs).abs().max().item() < 1e-4, layer


def test_after_a_rejection_and_steps_without_proposals_the_draft_recomputes_what_it_had_guessed(
    self_draft_engine, prompt_ids
):
    drafter, fresh = drafters(self_draft_engine, 2)
    seq = decoding(prompt_ids[0], range(1, 17))
    guess = drafter.propose(seq, 4)
    other = guess[1] + 1  # the target kept the first proposed token, then sampled another than the second
    seq.all_ids += [guess[0], other, 7, 8, 9]  # then three steps without proposals
    seq.num_cached += 5
    drafter.settle(SimpleNamespace(id=seq.id, num_cached=seq.num_cached - 3))  # as settled after the verify step
    assert drafter.propose(seq, 3) == fresh.propose(seq, 3)
    assert_same_draft_cache(drafter, fresh, seq)


def test_a_forgotten_sequence_is_drafted_afresh_in_its_new_blocks(self_draft_engine, prompt_ids):
    drafter, fresh = drafters(self_draft_engine, 2)
    seq = decoding(prompt_ids[1], range(1, 9))
    drafter.propose(seq, 2)
    drafter.forget(seq)  # preempted: its blocks went back, and it resumes in others
    seq.block_table = list(range(9, 17))
    assert drafter.propose(seq, 2) == fresh.propose(seq, 2)
    assert_same_draft_cache(drafter, fresh, seq)


class Failing:
    """A draft model whose forward raises."""

    def __call__(self, **inputs):
        raise RuntimeError("out of memory in the draft")


def test_a_failing_draft_stops_proposing_and_the_requests_go_on_as_without(self_draft_engine, prompt_ids, plain):
    proposer = self_draft_engine.scheduler.speculator.proposer
    model, proposer.model = proposer.model, Failing()
    before = self_draft_engine.stats()
    try:
        results = run_all(self_draft_engine, prompt_ids[:3])
        failure = proposer.failure
    finally:
        proposer.model, proposer.failure = model, None
    assert results == plain[:3]
    assert failure == "RuntimeError: out of memory in the draft"
    assert self_draft_engine.stats().speculative_proposed == before.speculative_proposed
    assert self_draft_engine.stats().blocks_used == 0  # the blocks reserved for the failed proposals came back


@pytest.mark.slow
def test_embedded_smollm2_greedy_is_byte_identical_with_its_first_layers_as_draft(embedded_folder, tmp_path):
    """The real embedded model (float32), 20 prompts, 4 running at a time (so every row may propose), its first 8
    layers as the draft (real weights that often disagree): the same tokens and text as with speculation off."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.unit.test_lean_model import SMOL_PROMPTS, settings_for

    draft = tmp_path / "smol-8-layers"
    AutoModelForCausalLM.from_pretrained(str(embedded_folder), num_hidden_layers=8).save_pretrained(draft)
    AutoTokenizer.from_pretrained(str(embedded_folder)).save_pretrained(draft)
    results, stats = {}, None
    for method in ("off", f"draft:{draft}"):
        chosen, source = method.partition(":")[::2]
        settings = settings_for(embedded_folder, max_concurrent_requests=4, speculative=chosen)
        engine = single_engine(replace(settings, speculative_draft=source or None)).start()
        assert engine.wait_ready(300), engine.load_error
        try:
            prompts = [engine.tokenizer(text)["input_ids"] for text in SMOL_PROMPTS]
            params = SamplingParams(max_new_tokens=48)
            streams = [engine.submit(Request(prompt_ids=prompt, params=params)) for prompt in prompts]
            results[chosen] = [[(event.token_id, event.text) for event in read(stream)] for stream in streams]
            stats = engine.stats()
        finally:
            engine.stop()
    assert results["draft"] == results["off"]
    assert stats.speculative_proposer == "draft" and stats.speculative_proposed > 0


def test_a_draft_without_pluggable_attention_is_refused():
    from serve.engine.draft import DraftProposer

    with pytest.raises(ValueError, match="the draft SimpleNamespace does not support pluggable attention"):
        DraftProposer(SimpleNamespace(device="cpu"), cache=None)
