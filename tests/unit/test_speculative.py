"""Speculative decoding's parts without a model: the n-gram proposer, acceptance, who may speculate, the room a
proposal gets in the KV pool, the tail blocks given back, and the counters."""

from types import SimpleNamespace

from serve.engine.block_manager import BlockManager
from serve.engine.speculative import (
    Proposer,
    SpeculativeConfig,
    Speculator,
    accept_proposals,
    accepted_length,
    may_speculate,
    ngram_proposal,
)
from serve.engine.types import EngineStats, Request, SamplingParams, TokenChoice


def test_ngram_proposes_what_followed_the_most_recent_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert ngram_proposal(tokens, 3, 2) == [7, 8]  # the later of the two matches of (1, 2, 3)
    assert ngram_proposal(tokens, 3, 10) == [7, 8, 5, 1, 2, 3, 7, 8, 5, 1]  # the copy goes on copying itself
    assert ngram_proposal([4, 5, 6, 7], 2, 3) == []  # (6, 7) never occurred before
    assert ngram_proposal([5, 5], 2, 3) == []  # too short to hold an earlier match
    assert ngram_proposal([5, 5, 5], 2, 3) == [5, 5, 5]


def test_accepted_length_is_the_agreeing_prefix():
    assert accepted_length([1, 2, 3], [1, 2, 4, 9]) == 2
    assert accepted_length([1, 2, 3], [0, 2, 3, 9]) == 0
    assert accepted_length([1, 2], [1, 2, 5]) == 2


def seq_with(proposal, cached=10, name="s"):
    return SimpleNamespace(id=name, proposal=proposal, num_cached=cached)


def test_accept_proposals_keeps_the_agreeing_run_plus_one_and_the_rows_without_proposals():
    plain, verified = seq_with([], 5, "plain"), seq_with([7, 8, 9], 10, "verified")
    sampled = [plain, verified, verified, verified, verified]
    choices = [TokenChoice(1), TokenChoice(7), TokenChoice(8), TokenChoice(4), TokenChoice(6)]
    sequences, kept = accept_proposals(sampled, choices)
    assert sequences == [plain, verified, verified, verified]
    assert [choice.token_id for choice in kept] == [1, 7, 8, 4]
    assert (plain.num_cached, verified.num_cached) == (5, 12)


def request(**params):
    return Request(prompt_ids=[1, 2, 3], params=SamplingParams(max_new_tokens=50, **params))


def test_rows_that_cannot_carry_a_proposal_do_not_speculate():
    ok = SimpleNamespace(request=request(), matcher=None)
    assert may_speculate(ok)
    assert may_speculate(SimpleNamespace(request=request(temperature=0.7), matcher=None))
    for params in (
        {"repetition_penalty": 1.2},
        {"presence_penalty": 0.5},
        {"logit_bias": ((3, 5.0),)},
        {"seed": 4, "temperature": 0.7},
        {"prompt_logprobs": True},
    ):
        assert not may_speculate(SimpleNamespace(request=request(**params), matcher=None)), params
    assert not may_speculate(SimpleNamespace(request=request(), matcher=object()))
    adapted = request()
    adapted.adapter = "a"
    assert not may_speculate(SimpleNamespace(request=adapted, matcher=None))


def running(tokens, cached, table, output=()):
    req = Request(prompt_ids=list(tokens), params=SamplingParams(max_new_tokens=50))
    return SimpleNamespace(
        id=req.id,
        request=req,
        matcher=None,
        output_ids=list(output),
        all_ids=list(tokens) + list(output),
        num_cached=cached,
        block_table=table,
        proposal=[],
    )


def test_a_proposal_takes_free_blocks_beyond_the_headroom_and_is_cut_to_the_room_there_is():
    blocks = BlockManager(num_blocks=4, block_size=4)
    table, _ = blocks.allocate([9] * 7, None, False)  # 2 blocks; 1 free beyond the headroom of 0
    seq = running([1, 2, 3, 4, 1, 2, 3], 6, table)
    speculator = Speculator(SpeculativeConfig("ngram", tokens=8, ngram=3))
    speculator.plan([seq], blocks, headroom=1)  # no block may be taken: the proposal fits what the table holds
    assert seq.proposal == [4] and len(table) == 2
    speculator.plan([seq], blocks, headroom=0)
    assert len(table) == 3 and seq.proposal == [4, 1, 2, 3, 4]  # 12 slots: 6 cached, the last token, 5 proposed
    seq.num_cached = 9  # the runner kept two proposed tokens
    speculator.settle([seq], [seq, seq, seq], blocks)
    assert seq.proposal == [] and len(table) == 3  # position 9 lies in the third block: kept
    assert (speculator.stats.proposed, speculator.stats.accepted, speculator.stats.accepted_lengths[2]) == (5, 2, 1)


class Recording(Proposer):
    """Proposes a run of 5s and records what the speculator tells it."""

    name = "recording"

    def __init__(self):
        self.settled, self.forgotten = [], []

    def propose(self, seq, k):
        return [5] * k

    def settle(self, seq):
        self.settled.append((seq.id, seq.num_cached))

    def forget(self, seq):
        self.forgotten.append(seq.id)


def test_the_proposer_hears_each_verified_outcome_and_each_sequence_that_stops():
    blocks = BlockManager(num_blocks=8, block_size=4)
    table, _ = blocks.allocate([9] * 6, None, False)
    seq, idle = running([1, 2, 3, 4, 5, 6], 5, table), running([1, 2], 1, [])
    proposer = Recording()
    speculator = Speculator(SpeculativeConfig("ngram", tokens=3), proposer)
    speculator.plan([seq], blocks, headroom=0)
    assert seq.proposal == [5, 5, 5] and len(table) == 3  # 9 tokens: 5 cached, the last one, 3 proposed
    seq.num_cached = 7  # the runner kept one proposed token
    speculator.settle([seq, idle], [seq, seq], blocks)
    assert proposer.settled == [(seq.id, 7)]  # the row without a proposal is not settled
    speculator.forgetting(lambda seq: None)(seq)
    assert proposer.forgotten == [seq.id]


def test_shrink_gives_back_the_tail_blocks():
    blocks = BlockManager(num_blocks=6, block_size=4)
    table, _ = blocks.allocate([1] * 16, None, False)
    assert blocks.free_blocks == 1
    blocks.shrink(table, 2)
    assert len(table) == 2 and blocks.free_blocks == 3
    blocks.shrink(table, 5)
    assert len(table) == 2


def test_under_load_and_past_max_tokens_nothing_is_proposed():
    speculator = Speculator(SpeculativeConfig("ngram", tokens=4, ngram=2))
    seq = running([1, 2, 1, 2, 1, 2], 5, [1, 2])
    assert speculator.propose(seq, batch=1) == [1, 2, 1, 2]
    assert speculator.propose(seq, batch=speculator.max_batch + 1) == []
    two_left = running([1, 2, 1, 2, 1, 2], 5, [1, 2], output=[7] * 48)
    assert speculator.propose(two_left, batch=1) == [7]  # one proposed, the last from the verify step
    one_left = running([1, 2, 1, 2, 1, 2], 5, [1, 2], output=[7] * 49)
    assert speculator.propose(one_left, batch=1) == []


def test_a_row_that_keeps_rejecting_proposes_only_now_and_then():
    speculator = Speculator(SpeculativeConfig("ngram", tokens=4, ngram=2))
    seq = running([1, 2, 1, 2, 1, 2], 5, [1, 2])
    for _ in range(3):
        speculator.record(seq.id, 4, 0)
    proposals = [speculator.propose(seq, batch=1) for _ in range(16)]
    assert sum(1 for proposal in proposals if proposal) == 2


def test_engine_stats_add_the_histograms_bucket_by_bucket():
    a = EngineStats(speculative_proposer="ngram", speculative_proposed=5, speculative_lengths=(1, 2))
    b = EngineStats(speculative_proposed=3, speculative_lengths=(0, 1, 4), steps=2)
    total = a + b
    assert (total.speculative_proposer, total.speculative_proposed) == ("ngram", 8)
    assert total.speculative_lengths == (1, 3, 4)
    assert total.steps == 2


def test_live_metrics_follow_the_engines_speculative_counters():
    from serve.metrics import LiveGauges

    stats = EngineStats(speculative_proposer="ngram", speculative_proposed=9, speculative_accepted=4)
    stats.speculative_lengths = (2, 1, 0, 1)
    engine = SimpleNamespace(stats=lambda: stats, waiting=0, running=0, in_flight=0, ready=True, engines=[])
    live = LiveGauges(engine, interval=3600)
    stats.speculative_accepted = 6
    live.refresh()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for counter in live.labelled.values()
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert samples[("serve_speculative_accepted_tokens_total", (("proposer", "ngram"),))] == 6
    assert samples[("serve_speculative_proposed_tokens_total", (("proposer", "ngram"),))] == 9
    assert samples[("serve_speculative_verifications_total", (("accepted", "3"), ("proposer", "ngram")))] == 1


def test_settings_choose_the_proposer_and_its_sizes():
    import pytest

    from serve.config import SettingsError, load_settings
    from serve.wiring import engine_config

    config = engine_config(load_settings({"SPECULATIVE": "ngram", "SPECULATIVE_TOKENS": "6", "SPECULATIVE_NGRAM": "2"}))
    assert (config.speculative, config.speculative_tokens, config.speculative_ngram) == ("ngram", 6, 2)
    assert engine_config(load_settings({})).speculative == "off"
    with pytest.raises(SettingsError, match="SPECULATIVE='medusa' is not one of off, ngram, draft:<model id or path>"):
        load_settings({"SPECULATIVE": "medusa"})
    draft = engine_config(load_settings({"SPECULATIVE": "Draft:/models/Small-1B"}))
    assert (draft.speculative, draft.speculative_draft) == ("draft", "/models/Small-1B")  # the path keeps its case
    assert engine_config(load_settings({"SPECULATIVE": "ngram"})).speculative_draft is None
    with pytest.raises(SettingsError, match="SPECULATIVE='draft' names no model: write draft:<model id or path>"):
        load_settings({"SPECULATIVE": "draft"})
    with pytest.raises(SettingsError, match="ngram takes no model"):
        load_settings({"SPECULATIVE": "ngram:/models/small"})
    with pytest.raises(SettingsError, match="SPECULATIVE_TOKENS"):
        load_settings({"SPECULATIVE_TOKENS": "0"})


def test_describe_says_what_proposes():
    assert SpeculativeConfig().describe() == "off"
    assert (
        SpeculativeConfig("ngram", 4, 2).describe() == "ngram: 4 tokens proposed per step, matching the last 2 tokens"
    )
    assert SpeculativeConfig("draft", 5, 3, "org/small").describe() == (
        "draft (org/small): 5 tokens proposed per step, the draft model's greedy tokens"
    )


def test_a_draft_speculator_needs_its_draft_model():
    import pytest

    from serve.engine.speculative import make_speculator
    from serve.engine.types import EngineConfig

    for method in ("draft", "eagle3"):
        config = EngineConfig(speculative=method, speculative_draft="org/small")
        with pytest.raises(ValueError, match=f"SPECULATIVE={method} needs its model loaded beside the target"):
            make_speculator(config)
    proposer = Recording()
    assert make_speculator(config, proposer).proposer is proposer
    assert make_speculator(EngineConfig(speculative="ngram"), proposer).proposer is not proposer
