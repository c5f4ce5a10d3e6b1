"""A seeded request's tokens depend on its seed, prompt and parameters only: not on how much of its prompt came from
the prefix cache, how its prompt was chunked, or what else shared its steps. Those change the shape of the step
that computes a row's logits, and with it the last bits of the logits (a matrix product's rounding depends on how
many rows it has), so the draw itself must not turn a rounding change into another token."""

import uuid

import pytest
import torch

from serve.engine import Engine, EngineConfig, Request, SamplingParams
from serve.engine.sampling import make_generator, sample_next_tokens
from serve.loading.loader import load_model
from tests.helpers import TINY_KV_TOKENS

CHAT = [{"role": "user", "content": "What is deep learning?"}]  # 35 tokens: 32 cached, 3 computed when warm
CHUNK_TOKENS = 7  # the small engine's prefill budget: the prompt takes several steps
SEEDS = range(16, 24)  # among them, seeds whose draws by rank went astray warm, chunked and in company
NEW_TOKENS = 20


def sample(logits: torch.Tensor, params: list[SamplingParams]) -> list[int]:
    generators = [make_generator(p, logits.device) for p in params]
    return sample_next_tokens(logits.clone(), params, generators).tolist()


def test_a_rounding_change_in_the_logits_keeps_every_seeded_draw():
    # exact ties broken by one ulp, as the same row computed over another step shape showed: a draw by rank moves
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (1, 2000), generator=generator).float() * 0.01
    nudged = torch.where(torch.rand(logits.shape, generator=generator) < 0.5, logits.nextafter(logits + 1), logits)
    params = [SamplingParams(temperature=0.9, seed=seed) for seed in range(32)]
    assert sample(logits.repeat(32, 1), params) == sample(nudged.repeat(32, 1), params)


def test_seeded_draws_follow_the_filtered_probabilities():
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).log().repeat(4000, 1)  # the last token has probability 0
    tokens = sample(logits, [SamplingParams(temperature=1.0, seed=seed) for seed in range(4000)])
    share = [tokens.count(token) / len(tokens) for token in range(4)]
    assert share[0] == pytest.approx(0.5, abs=0.03) and share[1] == pytest.approx(0.3, abs=0.03)
    assert share[2] == pytest.approx(0.2, abs=0.03) and share[3] == 0
    kept = sample(logits[:64], [SamplingParams(temperature=1.0, top_k=2, seed=seed) for seed in range(64)])
    assert set(kept) == {0, 1}


@pytest.fixture(scope="module")
def chunking_engine(tiny_settings):
    engine = Engine(
        load=lambda: load_model(tiny_settings),
        config=EngineConfig(max_batch_prefill_tokens=CHUNK_TOKENS, max_batch_total_tokens=TINY_KV_TOKENS),
    ).start()
    assert engine.wait_ready(60), engine.load_error
    yield engine
    engine.stop()


def chat_prompt(engine: Engine) -> list[int]:
    return list(engine.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False))


def seeded(prompt: list[int], seed: int, salt: str) -> Request:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.9, seed=seed, ignore_eos=True)
    return Request(prompt_ids=prompt, params=params, cache_salt=salt)


def generate(engine: Engine, request: Request) -> tuple[list[int], int]:
    """The request's tokens, and how many of its prompt tokens came from the prefix cache."""
    events = list(engine.submit(request))
    return [event.token_id for event in events if event.token_id is not None], events[-1].cached_tokens


def cold_runs(engine: Engine, prompt: list[int]) -> dict[int, list[int]]:
    """Each seed's tokens with a cache partition of its own: the whole prompt computed in one step."""
    return {seed: generate(engine, seeded(prompt, seed, uuid.uuid4().hex))[0] for seed in SEEDS}


def test_a_seed_gives_the_same_tokens_with_a_cold_or_warm_cache(tiny_engine):
    prompt = chat_prompt(tiny_engine)
    for seed in SEEDS:
        salt = uuid.uuid4().hex  # a partition of the cache no other test has warmed
        cold, cold_cached = generate(tiny_engine, seeded(prompt, seed, salt))
        warm, warm_cached = generate(tiny_engine, seeded(prompt, seed, salt))
        assert (cold_cached, warm_cached) == (0, 32) and len(cold) == NEW_TOKENS
        assert warm == cold, seed


def prefill_sizes(engine: Engine) -> tuple[list[int], callable]:
    """Wrap the runner's step to log the prompt tokens each step prefills; returns the log and the undo."""
    runner, log = engine._runner, []
    step = runner.step

    def logging(plan):
        log.append(sum(count for _, count in plan.prefill))
        return step(plan)

    runner.step = logging
    return log, lambda: setattr(runner, "step", step)


def test_a_seed_gives_the_same_tokens_however_the_prompt_is_chunked(tiny_engine, chunking_engine):
    prompt = chat_prompt(tiny_engine)
    whole = cold_runs(tiny_engine, prompt)
    log, restore = prefill_sizes(chunking_engine)
    try:
        chunked = cold_runs(chunking_engine, prompt)
    finally:
        restore()
    assert len([size for size in log if size]) >= 5 * len(SEEDS) and max(log) <= CHUNK_TOKENS  # 35 in 7s
    assert chunked == whole


def test_a_seed_gives_the_same_tokens_whatever_shares_its_steps(tiny_engine, chunking_engine):
    prompt = chat_prompt(tiny_engine)
    alone = cold_runs(tiny_engine, prompt)
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    together = {}
    for seed in SEEDS:
        others = [chunking_engine.submit(Request(prompt_ids=prompt[i:], params=greedy)) for i in range(1, 4)]
        together[seed] = generate(chunking_engine, seeded(prompt, seed, uuid.uuid4().hex))[0]
        assert all(len([event for event in stream if event.token_id is not None]) == NEW_TOKENS for stream in others)
    assert together == alone
