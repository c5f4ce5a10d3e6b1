"""Steps with prompt chunks replayed piecewise (serve/engine/piecewise.py), proven on the CPU through the same
buffers, padding and bucket choice a GPU replays: the capture is the function itself (a replay runs it again over
the static buffers), where a GPU records a CUDA graph. Tokens equal the eager engine's; a bucket whose self-check
fails, a step past the largest bucket, and a step with an adapter run eagerly."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from serve.engine import Request, SamplingParams
from serve.engine.piecewise import capture_piecewise, token_buckets
from serve.engine.types import STEP_PATHS
from serve.wiring import single_engine

PIECEWISE = STEP_PATHS.index("piecewise")
QUESTIONS = ["Name three colours:", "Count to ten:", "Why is the sky blue?", "Write a haiku about rain."]


def rerun(run):
    """The CPU's capture: the replay is the function itself, over the same static buffers."""
    return run


def test_buckets_cover_every_token_count_up_to_the_widest_step():
    assert token_buckets(100) == [16, 32, 64, 100]
    assert token_buckets(4224)[-3:] == [3072, 4096, 4224]


def test_models_without_halves_or_under_eagle3_or_tensor_parallelism_say_why():
    assert "lean model" in capture_piecewise(SimpleNamespace(), 64, rerun).reason
    assert "EAGLE-3" in capture_piecewise(SimpleNamespace(layer_halves=(), serve_aux_layers={1}), 64, rerun).reason
    assert "tensor parallelism" in capture_piecewise(SimpleNamespace(), 64, rerun, tensor_parallel=True).reason
    cpu = SimpleNamespace(layer_halves=(), serve_aux_layers=frozenset(), device=torch.device("cpu"))
    assert "no CUDA" in capture_piecewise(cpu, 64).reason


def start(settings, capture=None, widest=96):
    engine = single_engine(settings).start()
    assert engine.wait_ready(120), engine.load_error
    if capture is not None:
        engine._runner.capture_graphs(widest, capture)
    return engine


def mixed_requests(encode):
    """Seeded requests of different lengths: with a small prefill budget their chunks share steps with the others'
    decode rows."""
    prompts = [encode(question * 3 * (1 + index)) for index, question in enumerate(QUESTIONS)]
    return [
        Request(prompt_ids=p, params=SamplingParams(max_new_tokens=12, temperature=1.0, seed=i, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]


def run(engine, requests):
    streams = [engine.submit(request) for request in requests]
    return [[event.token_id for event in stream if event.token_id is not None] for stream in streams]


def run_counting_paths(engine, requests):
    """(each request's tokens, the steps each path took meanwhile), and the engine stopped."""
    try:
        before = engine.stats().step_paths
        tokens = run(engine, requests)
        return tokens, [now - then for now, then in zip(engine.stats().step_paths, before)]
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def encode(tiny_engine):
    return lambda text: tiny_engine.tokenizer(text)["input_ids"]


@pytest.fixture(scope="module")
def settings(tiny_settings):
    return replace(tiny_settings, max_batch_prefill_tokens=24)


@pytest.fixture(scope="module")
def eager_tokens(settings, encode):
    engine = start(settings)
    try:
        return run(engine, mixed_requests(encode))
    finally:
        engine.stop()


def test_steps_with_prompt_chunks_replayed_piecewise_give_the_eager_tokens(settings, encode, eager_tokens):
    engine = start(settings, rerun)
    report = engine.graphs.mixed
    installed = engine.loaded.model.layer_halves[0].__self__ is engine._runner.piecewise
    tokens, paths = run_counting_paths(engine, mixed_requests(encode))
    assert report.enabled and report.buckets == [16, 32, 64, 96] and report.probe_error < 1e-5 and installed
    assert tokens == eager_tokens
    assert paths[PIECEWISE] >= 8 and paths[STEP_PATHS.index("eager")] == 0  # every prompt step replayed


def test_the_embedded_model_answers_alike_with_its_prompt_steps_replayed_piecewise(tiny_settings, embedded_folder):
    """SmolLM2's real weights: attention and RoPE shape its text (the tiny random model's near-uniform attention would
    hide a position error); greedy, four prompts whose chunks share steps with the others' decode rows."""
    settings = replace(tiny_settings, model_id=str(embedded_folder), max_batch_prefill_tokens=32)
    answers = {}
    for capture in (None, rerun):
        engine = start(settings, capture, widest=64)
        try:
            encode = lambda text: engine.tokenizer(text)["input_ids"]  # noqa: E731
            requests = [
                Request(prompt_ids=encode(q * 2), params=SamplingParams(max_new_tokens=10, ignore_eos=True))
                for q in QUESTIONS
            ]
            before = engine.stats().step_paths[PIECEWISE]
            answers[capture] = run(engine, requests)
            replayed = engine.stats().step_paths[PIECEWISE] - before
        finally:
            engine.stop()
        assert (replayed > 0) is (capture is not None)
    assert answers[rerun] == answers[None]


def test_a_step_past_the_largest_bucket_runs_eagerly(settings, encode, eager_tokens):
    engine = start(settings, rerun, widest=16)  # one bucket: 16 tokens; the 24-token chunks do not fit
    tokens, paths = run_counting_paths(engine, mixed_requests(encode))
    assert tokens == eager_tokens
    assert paths[STEP_PATHS.index("eager")] > 0


def test_a_bucket_whose_replay_differs_is_dropped_and_its_steps_run_eagerly(settings, encode, eager_tokens):
    layers = 2  # the tiny Llama's; captures go largest bucket first, both halves of each layer
    order, captured = sorted(token_buckets(96), reverse=True), []

    def skipping(run):
        """A replay that computes nothing for the 32-token bucket (a broken graph): its check must catch it."""
        bucket = order[len(captured) // (2 * layers)]
        captured.append(bucket)
        return (lambda: None) if bucket == 32 else run

    engine = start(settings, skipping)
    try:
        assert len(engine.loaded.model.model.layers) == layers
        report = engine.graphs.mixed
        assert report.enabled and report.buckets == [16, 64, 96]
        assert len(report.dropped) == 1 and report.dropped[0].startswith("32: replay differs")
        assert {bucket for _, bucket, _ in engine._runner.piecewise.replays} == {16, 64, 96}
        tokens = run(engine, mixed_requests(encode))
    finally:
        engine.stop()
    assert tokens == eager_tokens


def test_a_capture_that_fails_leaves_the_eager_halves_and_says_why(tiny_engine):
    model = tiny_engine.loaded.model
    halves = model.layer_halves

    def failing(run):
        raise RuntimeError("out of memory in the graph pool")

    report = capture_piecewise(model, 64, failing)
    assert not report.enabled and "out of memory" in report.reason
    assert model.layer_halves == halves


def test_a_step_with_an_adapter_runs_the_halves_eagerly(settings):
    engine = start(settings, rerun)
    try:
        runner = engine._runner
        with_adapter = SimpleNamespace(adapters=["tenant-a", None], ids=[1, 2])
        plain = SimpleNamespace(adapters=None, ids=[1, 2])
        assert runner._eager_path(with_adapter) == STEP_PATHS.index("eager") and not runner.piecewise.active
        assert runner._eager_path(plain) == PIECEWISE and runner.piecewise.active
    finally:
        engine.stop()
