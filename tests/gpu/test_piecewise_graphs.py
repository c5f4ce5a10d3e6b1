"""On CUDA: steps with prompt chunks replay each layer's halves from CUDA graphs (serve/engine/piecewise.py). The
graphs are captured and self-checked at start-up, and a mixed workload's greedy tokens equal those of an engine
whose steps all run eagerly (CUDA_GRAPHS=false). Skipped without a GPU."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytestmark = pytest.mark.gpu

QUESTIONS = ["Name three colours:", "Count to ten:", "Why is the sky blue?", "Write a haiku about rain."]


def tokens_of(settings):
    """(greedy tokens of four prompts whose chunks share steps with decode rows, the graph report, steps by path)."""
    from serve.engine import Request, SamplingParams
    from serve.wiring import single_engine

    engine = single_engine(settings).start()
    try:
        assert engine.wait_ready(300), engine.load_error
        encode = lambda text: engine.tokenizer(text)["input_ids"]  # noqa: E731
        params = SamplingParams(max_new_tokens=16, ignore_eos=True)
        streams = [
            engine.submit(Request(prompt_ids=encode(q * 4 * (1 + i)), params=params)) for i, q in enumerate(QUESTIONS)
        ]
        tokens = [[event.token_id for event in stream if event.token_id is not None] for stream in streams]
        return tokens, engine.graphs, engine.stats().step_paths
    finally:
        engine.stop()


def test_prompt_steps_replayed_piecewise_give_the_eager_tokens(tiny_settings):
    from serve.engine.types import STEP_PATHS

    settings = replace(tiny_settings, max_batch_prefill_tokens=48)
    graphed, report, paths = tokens_of(settings)
    eager, _, _ = tokens_of(replace(settings, cuda_graphs=False))
    assert report.mixed.enabled, report.mixed
    assert report.mixed.buckets[-1] == 48 + settings.max_concurrent_requests
    assert paths[STEP_PATHS.index("piecewise")] > 0
    assert graphed == eager
