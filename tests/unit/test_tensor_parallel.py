"""Tensor parallelism on the CPU, through the same code a GPU runs (gloo in place of NCCL): an engine of two ranks
gives the same greedy tokens as one rank for every lean family, with GQA and a replicated KV head, LoRA, prefix-cache
hits and preemption; a rank that dies ends every request in flight with an error naming it."""

from dataclasses import replace

import pytest
from transformers import AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from serve.engine import FinishReason, Request, SamplingParams
from serve.modeling.parallel import ShardError, ShardLayout
from serve.wiring import single_engine
from tests.unit.test_lean_model import SHAPE, TEXTS, save_adapters, save_random_model, settings_for

NEW_TOKENS = 8
SMALL_POOL = 4096  # tokens of KV cache: enough for the tests, quick to allocate on every rank

FAMILIES = {
    "llama-gqa-2kv": lambda vocab: LlamaConfig(vocab_size=vocab, **SHAPE),
    "llama-1kv-replicated": lambda vocab: LlamaConfig(vocab_size=vocab, **{**SHAPE, "num_key_value_heads": 1}),
    "llama-tied-bias-odd-vocab": lambda vocab: LlamaConfig(
        vocab_size=vocab + 1, tie_word_embeddings=True, attention_bias=True, **SHAPE
    ),
    "mistral": lambda vocab: MistralConfig(vocab_size=vocab, sliding_window=None, **SHAPE),
    "qwen2-bias": lambda vocab: Qwen2Config(vocab_size=vocab, **SHAPE),
    "qwen3-qk-norm": lambda vocab: Qwen3Config(vocab_size=vocab, head_dim=24, **SHAPE),
}


@pytest.fixture(scope="module")
def tokenizer(embedded_folder):
    return AutoTokenizer.from_pretrained(str(embedded_folder))


def run_engine(settings, waves: list[list[Request]]) -> tuple[list[list[int]], tuple]:
    """Each wave's requests submitted at once (one continuous batch), after the previous wave finished; (every
    request's tokens, (the engine's stats, its preemptions))."""
    engine = single_engine(settings).start()
    try:
        assert engine.wait_ready(180), engine.load_error
        tokens = []
        for wave in waves:
            streams = [engine.submit(request) for request in wave]
            tokens += [[event.token_id for event in stream if event.token_id is not None] for stream in streams]
        return tokens, (engine.stats(), engine.scheduler.preemptions)
    finally:
        engine.stop()


def greedy(prompts: list[list[int]], adapter=None, new_tokens: int = NEW_TOKENS) -> list[Request]:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [Request(prompt, params, adapter=adapter) for prompt in prompts]


def both(settings, waves_of) -> tuple[tuple, tuple]:
    """(one rank's result, two ranks' result) of the same requests."""
    one = run_engine(settings, waves_of())
    two = run_engine(replace(settings, tensor_parallel_size=2), waves_of())
    return one, two


@pytest.mark.parametrize("family", list(FAMILIES))
def test_two_ranks_give_the_tokens_of_one(family, tokenizer, tmp_path):
    config = FAMILIES[family](len(tokenizer))
    folder = save_random_model(config, tmp_path / family, tokenizer)
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    (one, _), (two, _) = both(settings_for(folder, max_batch_total_tokens=SMALL_POOL), lambda: [greedy(prompts)])
    assert two == one
    if not config.tie_word_embeddings:  # a tied random model answers every prompt alike; the others must not
        assert len({tuple(tokens) for tokens in one}) > 1, "the random model says the same thing to every prompt"


def test_prefix_cache_hits_and_preemption_keep_the_tokens(tokenizer, tmp_path):
    """A first request, then the same prompt again (a prefix-cache hit) with three others in a pool too small for
    all four to grow: sequences are preempted and resumed."""
    folder = save_random_model(FAMILIES["llama-gqa-2kv"](len(tokenizer)), tmp_path / "llama", tokenizer)
    long_prompt = tokenizer(TEXTS[3] + " and then the story went on for a long while")["input_ids"]
    others = [tokenizer(text)["input_ids"] for text in TEXTS[:3]]
    settings = settings_for(folder, max_total_tokens=128, max_batch_total_tokens=96, max_batch_prefill_tokens=64)

    def waves() -> list[list[Request]]:
        return [greedy([long_prompt]), greedy([long_prompt, *others], new_tokens=60)]

    (one, (_, preempted_one)), (two, (stats, preempted_two)) = both(settings, waves)
    assert two == one
    assert preempted_two > 0 and preempted_one > 0
    assert stats.prefix_hit_tokens > 0


def test_two_ranks_working_ahead_give_the_tokens_of_one_reading_each_step(tokenizer, tmp_path):
    """ASYNC_SCHEDULING=true over two ranks: rank 0 broadcasts the token ids it feeds from its device, in decode-only
    steps and in steps that mix prompt chunks with decode rows (a small prefill budget). Seeded sampling: a rank fed
    another token would draw otherwise."""
    folder = save_random_model(FAMILIES["llama-gqa-2kv"](len(tokenizer)), tmp_path / "llama", tokenizer)
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    settings = settings_for(folder, max_batch_total_tokens=SMALL_POOL, max_batch_prefill_tokens=8)

    def waves() -> list[list[Request]]:
        sampled = [
            SamplingParams(max_new_tokens=10 + 2 * i, temperature=1.0, seed=i, ignore_eos=True) for i in range(4)
        ]
        return [[Request(prompts[i % len(prompts)], params) for i, params in enumerate(sampled)]]

    one, _ = run_engine(replace(settings, async_scheduling="false"), waves())
    two, (stats, _) = run_engine(replace(settings, tensor_parallel_size=2, async_scheduling="true"), waves())
    assert two == one and stats.steps_ahead > 0
    assert len({tuple(tokens) for tokens in one}) == len(one)


def test_lora_adapters_split_with_the_layers(tiny_model_dir, tokenizer, tmp_path):
    """Adapters on column-parallel (q, v, gate) and row-parallel (o, down) projections; base rows in the same batch."""
    folders = save_adapters(
        tiny_model_dir, tmp_path, (["q_proj", "v_proj", "gate_proj"], ["k_proj", "o_proj", "down_proj"])
    )
    adapters = tuple((name, str(path)) for name, path in folders.items())
    settings = settings_for(tiny_model_dir, lora_adapters=adapters, max_batch_total_tokens=SMALL_POOL)
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS[:2]]

    def requests() -> list[list[Request]]:
        return [[request for adapter in (None, "a1", "a2") for request in greedy(prompts, adapter)]]

    (one, _), (two, _) = both(settings, requests)
    assert two == one
    assert one[0] != one[2] and one[0] != one[4], "an adapter changed nothing"


def test_a_rank_that_dies_ends_the_requests_in_flight_with_an_error_naming_it(tiny_model_dir, tokenizer):
    settings = settings_for(tiny_model_dir, tensor_parallel_size=2, max_batch_total_tokens=SMALL_POOL)
    engine = single_engine(settings).start()
    try:
        assert engine.wait_ready(180), engine.load_error
        prompt = tokenizer(TEXTS[0])["input_ids"]
        stream = engine.submit(Request(prompt, SamplingParams(max_new_tokens=400, ignore_eos=True)))
        next(iter(stream))  # running
        process, _ = engine.loaded.ranks.workers[0]
        process.kill()
        events = list(stream)
        assert events[-1].finish_reason is FinishReason.ERROR
        assert "rank 1" in events[-1].error
        assert not engine.ready
        assert not process.is_alive()
    finally:
        engine.stop()


def test_shard_layout_splits_heads_and_replicates_kv_heads():
    config = LlamaConfig(**{**SHAPE, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 101})
    layouts = [ShardLayout.of(config, rank, 4) for rank in range(4)]
    assert [layout.heads for layout in layouts] == [2] * 4
    assert [(layout.kv_heads, layout.kv_start) for layout in layouts] == [(1, 0), (1, 0), (1, 1), (1, 1)]
    assert [layout.vocab_range() for layout in layouts] == [(0, 26), (26, 52), (52, 78), (78, 101)]
    split = ShardLayout.of(config, 1, 2)
    assert (split.kv_heads, split.kv_start, split.rows_of("k_proj")) == (1, 1, slice(8, 16))
    assert split.columns_of("down_proj") == slice(48, 96)
    with pytest.raises(ShardError, match="attention heads"):
        ShardLayout.of(config, 0, 3)
    with pytest.raises(ShardError, match="replicated"):
        ShardLayout.of(
            LlamaConfig(**{**SHAPE, "hidden_size": 96, "num_attention_heads": 12, "num_key_value_heads": 3}), 0, 4
        )


def test_each_engine_process_starts_with_only_its_gpus_visible(tmp_path):
    """The environment a copy's engine process is spawned in (serve.wiring.engine_environment), for a simulated
    8-GPU instance at TP=2, as the spawned child itself reads it; the server's own environment is left as it was."""
    import multiprocessing
    import os
    from types import SimpleNamespace

    from serve.config import Settings
    from serve.loading.placement import EnginePlacement, PlacementPlan
    from serve.wiring import engine_environment

    engines = tuple(EnginePlacement((f"cuda:{2 * i}", f"cuda:{2 * i + 1}"), tensor_parallel=2) for i in range(4))
    prepared = SimpleNamespace(plan=PlacementPlan("tensor-parallel", engines, "simulated"))
    settings = Settings(cuda_visible_devices="0,1,2,3,4,5,6,7")
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    context = multiprocessing.get_context("spawn")
    for index in range(4):  # a child that only writes down what it sees (os.system: no test module to import)
        report = tmp_path / f"copy{index}"
        process = context.Process(target=os.system, args=(f'printf "%s" "$CUDA_VISIBLE_DEVICES" > {report}',))
        with engine_environment(settings, prepared, index)():
            process.start()
        process.join(60)
    seen = [(tmp_path / f"copy{index}").read_text() for index in range(4)]
    assert seen == ["0,1", "2,3", "4,5", "6,7"]
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == before


def test_a_rank_that_hangs_fails_the_collective_after_the_timeout(tiny_model_dir, tokenizer):
    """SIGSTOP on rank 1: rank 0's next collective gives up after TENSOR_PARALLEL_TIMEOUT_S; nothing waits forever."""
    import os
    import signal

    settings = settings_for(
        tiny_model_dir, tensor_parallel_size=2, max_batch_total_tokens=SMALL_POOL, tensor_parallel_timeout_s=3.0
    )
    engine = single_engine(settings).start()
    try:
        assert engine.wait_ready(180), engine.load_error
        process, _ = engine.loaded.ranks.workers[0]
        stream = engine.submit(
            Request(tokenizer(TEXTS[0])["input_ids"], SamplingParams(max_new_tokens=2000, ignore_eos=True))
        )
        next(iter(stream))
        os.kill(process.pid, signal.SIGSTOP)
        events = list(stream)
        assert events[-1].finish_reason is FinishReason.ERROR and "tensor-parallel step failed" in events[-1].error
        assert not engine.ready
    finally:
        engine.stop()
