import pytest
import torch

from serve.engine.penalties import TokenCounts, apply_penalties, count_sampled
from serve.engine.sampling import make_generator, sample_next_tokens
from serve.engine.types import SamplingParams


def sample(logits, params, generators=None):
    generators = generators or [make_generator(p, torch.device("cpu")) for p in params]
    return sample_next_tokens(logits.clone(), params, generators)


def test_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    assert sample(logits, [SamplingParams(), SamplingParams()]).tolist() == [1, 0]


def test_top_k_one_is_greedy_even_when_sampling():
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 4
    assert sample(logits, params).tolist() == logits.argmax(-1).tolist()


def test_tiny_top_p_keeps_only_the_best_token():
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=1.0, top_p=1e-6)] * 3
    assert sample(logits, params).tolist() == logits.argmax(-1).tolist()


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.zeros(1, 1000)

    def draws(seed):
        return [int(sample(logits, [SamplingParams(temperature=1.0, seed=seed)])[0])]

    first = [draws(7)[0] for _ in range(3)]
    assert len(set(first)) == 1
    assert {draws(seed)[0] for seed in range(20)} != {first[0]}


def test_mixed_batch_keeps_greedy_rows_greedy():
    logits = torch.tensor([[0.0, 10.0, 0.0], [0.0, 0.0, 0.0]])
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=3)]
    assert int(sample(logits, params)[0]) == 1


def penalize(logits, params, histories):
    """Penalties from device-side counts: ``histories`` are each row's (prompt, output) tokens."""
    counts = TokenCounts(logits.shape[-1], torch.device("cpu"))
    rows = counts.rows([str(i) for i in range(len(params))], histories)
    return apply_penalties(logits.clone(), params, counts, rows), counts, rows


def test_repetition_penalty_discourages_seen_tokens():
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams(repetition_penalty=2.0)]
    logits, _, _ = penalize(torch.tensor([[2.0, 1.5], [-1.0, -1.5]]), params, [([0], []), ([], [0])])
    assert logits.tolist() == [[1.0, 1.5], [-2.0, -1.5]]  # positive divided, negative multiplied


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    params = [SamplingParams(frequency_penalty=1.0), SamplingParams(presence_penalty=0.5)]
    logits, counts, rows = penalize(torch.tensor([[2.0, 1.5, 0.0]] * 2), params, [([0], [0, 0]), ([1], [2, 2])])
    assert logits.tolist() == [[0.0, 1.5, 0.0], [2.0, 1.5, -0.5]]  # prompt tokens are not output
    count_sampled(counts, rows, torch.tensor([1, 1]))
    assert counts.matrix[rows[0], 1].tolist() == [2, 1, 0] and counts.matrix[rows[1], 0].tolist() == [0, 2, 2]
    assert counts.matrix[rows[0], 0].tolist() == [3, 1, 0]  # seen: prompt and output


def test_count_rows_are_reused_after_release_and_grow_on_demand():
    counts = TokenCounts(5, torch.device("cpu"))
    first = counts.rows(["a", "b", "c", "d", "e"], [([1], [])] * 5)
    assert len(set(first)) == 5 and counts.matrix.shape[0] >= 5
    counts.release("c")
    assert counts.rows(["f"], [([2], [])]) == [first[2]] and counts.matrix[first[2], 0].tolist() == [0, 0, 1, 0, 0]


def test_min_p_drops_tokens_far_less_likely_than_the_best():
    logits = torch.tensor([[5.0, 4.9, 0.0, -1.0]] * 64)
    params = [SamplingParams(temperature=1.0, min_p=0.5, seed=seed) for seed in range(64)]
    assert set(sample(logits, params).tolist()) == {0, 1}


def test_typical_p_keeps_the_tokens_closest_to_the_entropy():
    # a mildly favoured token among 50 flat ones: its surprise is far below the entropy, theirs is close to it
    logits = torch.tensor([2.0] + [1.0] * 50)[None].repeat(32, 1)
    params = [SamplingParams(temperature=1.0, typical_p=0.2, seed=seed) for seed in range(32)]
    chosen = sample(logits, params).tolist()
    assert 0 not in chosen and len(set(chosen)) > 1


def test_chosen_logprobs_and_top_alternatives():
    from serve.engine.sampling import logprob_table, unpack_logprobs

    log_probs = torch.log_softmax(torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 5.0]]), dim=-1)
    first, second = logprob_table(log_probs, torch.tensor([2, 2]), 2).tolist()
    token0, lp0, top0 = unpack_logprobs(first, 2, 2)
    token1, lp1, top1 = unpack_logprobs(second, 0, 2)
    assert token0 == token1 == 2
    assert lp0 == pytest.approx(float(log_probs[0, 2])) and [t for t, _ in top0] == [1, 2]
    assert top0[0][1] == pytest.approx(float(log_probs[0, 1]))
    assert lp1 == pytest.approx(float(log_probs[1, 2])) and top1 == ()


def test_logit_bias_is_per_row_and_batched():
    logits = torch.zeros(3, 6)
    logits[:, 2] = 5.0  # every row's argmax is 2 without bias
    params = [
        SamplingParams(logit_bias=((2, -100.0),)),
        SamplingParams(logit_bias=((4, 100.0), (2, -100.0))),
        SamplingParams(),
    ]
    assert sample(logits, params).tolist() == [0, 4, 2]
    sampled = [SamplingParams(temperature=1.0, seed=seed, logit_bias=((5, 100.0),)) for seed in range(3)]
    assert sample(torch.randn(3, 6), sampled).tolist() == [5, 5, 5]  # +100 forces under sampling too


def test_logit_bias_adds_repeated_entries_and_leaves_a_strided_batch_intact():
    from serve.engine.sampling import apply_logit_bias

    logits = torch.zeros(4, 3).T  # not contiguous: rows 3 wide, laid out by column
    params = [SamplingParams(logit_bias=((1, 2.0), (1, 3.0), (3, -1.0))), SamplingParams(), SamplingParams()]
    biased = apply_logit_bias(logits, params)
    assert biased.tolist() == [[0.0, 5.0, 0.0, -1.0], [0.0] * 4, [0.0] * 4]


def test_prompt_scores_pick_targets_and_top_alternatives():
    from serve.engine.sampling import prompt_scores

    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    picked, tops = prompt_scores(logits, [1, 0], top=2)
    expected = torch.log_softmax(logits, dim=-1)
    assert picked == [expected[0, 1].item(), expected[1, 0].item()]
    assert [ids for ids, _ in tops[0]] == [2, 1] and [ids for ids, _ in tops[1]][0] == 0
    assert prompt_scores(logits, [1, 0], top=0)[1] == [(), ()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_rows_finds_every_nan_and_infinity(dtype):
    from serve.engine.sampling import finite_rows

    logits = torch.randn(6, 1000).to(dtype)
    logits[1, 17] = float("nan")
    logits[2, 999] = float("inf")
    logits[3, 0] = float("-inf")
    logits[4, 500] = torch.finfo(dtype).max  # large but finite (a sum of the row would overflow)
    logits[4, 501] = torch.finfo(dtype).max
    logits[5] = float("nan")
    expected = torch.isfinite(logits).all(dim=-1)
    assert finite_rows(logits).tolist() == expected.tolist() == [True, False, False, False, True, False]
