"""On CUDA: a decode step holding every kind of row (greedy, sampled, seeded, penalised, logit_bias, logprobs,
grammar, watermark) runs under ``torch.cuda.set_sync_debug_mode("error")``: no blocking upload, no hidden read,
only the step's one read through ``ModelRunner.to_host`` (skipped without a GPU)."""

from __future__ import annotations

import traceback

import pytest
import torch

pytestmark = pytest.mark.gpu

NEW_TOKENS = 8


def every_row_kind():
    """One request's parameters per kind of row (the grammar's first: its matcher compiles off the step)."""
    from serve.engine.grammar import regex_grammar
    from serve.engine.types import SamplingParams, Watermark

    common = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True}
    return [
        SamplingParams(grammar=regex_grammar("[a-z ]{200,900}"), **common),
        SamplingParams(**common),
        SamplingParams(temperature=0.7, top_p=0.9, **common),
        SamplingParams(temperature=0.8, top_k=20, typical_p=0.8, min_p=0.05, seed=3, **common),
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2, **common),
        SamplingParams(logit_bias=((5, 3.0), (7, -100.0)), **common),
        SamplingParams(logprobs=3, **common),
        SamplingParams(watermark=Watermark(), **common),
    ]


@pytest.fixture(scope="module")
def engine(tiny_settings):
    from serve.wiring import single_engine

    engine = single_engine(tiny_settings).start()
    assert engine.wait_ready(300), engine.load_error
    assert engine._runner.device.type == "cuda"
    yield engine
    engine.stop()


def strict_decode_steps(engine, with_prompts=False):
    """Launch the runner's decode-only steps (and steps holding prompt chunks ``with_prompts``) with sync debug mode
    at "error" (its ``to_host`` read allowed); return the failures, each strict step's decode row count, and a
    function that restores the runner. Whether the engine reads each step at once or works ahead, every step goes
    through ``launch``."""
    runner = engine._runner
    launch, to_host, failures, widths = runner.launch, runner.to_host, [], []

    def allowed_read(tensor):
        torch.cuda.set_sync_debug_mode("default")
        try:
            return to_host(tensor)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    def strict_launch(plan, pending=None):
        if plan.prefill and not with_prompts:
            return launch(plan, pending)
        torch.cuda.set_sync_debug_mode("error")
        try:
            result = launch(plan, pending)
        except RuntimeError:
            failures.append(traceback.format_exc())
            raise
        finally:
            torch.cuda.set_sync_debug_mode("default")
        widths.append(len(plan.decode))
        return result

    runner.launch, runner.to_host = strict_launch, allowed_read
    return failures, widths, lambda: (setattr(runner, "launch", launch), setattr(runner, "to_host", to_host))


def run_all_kinds(engine):
    """Submit one request of each kind (the grammar's once its matcher is built) and return each one's tokens."""
    from serve.engine import Request
    from tests.helpers import wait_for

    prompt = engine.tokenizer("Count the ways:")["input_ids"]
    kinds = every_row_kind()
    streams = [engine.submit(Request(prompt_ids=prompt, params=kinds[0]))]
    assert wait_for(lambda: engine.matchers.compiling == 0, timeout=60)
    streams += [engine.submit(Request(prompt_ids=prompt, params=params)) for params in kinds[1:]]
    outputs = []
    for stream in streams:
        events = list(stream)
        assert all(event.error is None for event in events), [event.error for event in events if event.error]
        outputs.append([event.token_id for event in events if event.token_id is not None])
    return outputs


def strict_run(engine, with_prompts=False):
    """Every row kind once unchecked (kernels compiled, handles made, staging buffers allocated), then again with the
    runner's steps strict (no failure allowed): (each strict step's decode rows, each request's tokens, host reads)."""
    run_all_kinds(engine)
    failures, widths, restore = strict_decode_steps(engine, with_prompts)
    reads = engine._runner.host_reads
    try:
        outputs = run_all_kinds(engine)
    finally:
        restore()
    assert failures == [], failures[0]
    assert [len(tokens) for tokens in outputs] == [NEW_TOKENS] * len(outputs)
    return widths, outputs, engine._runner.host_reads - reads


def test_a_step_of_every_row_kind_makes_no_hidden_sync(engine):
    widths, outputs, reads = strict_run(engine)
    assert widths and max(widths) == len(outputs)  # one strict step sampled every kind at once
    assert reads >= len(widths)


def test_steps_with_prompt_chunks_make_no_hidden_sync(engine):
    """Prompt chunks' inputs (serve/engine/step_inputs.py) go through the same pinned staging buffers."""
    strict_run(engine, with_prompts=True)


def test_penalty_rows_are_filled_without_a_sync():
    """A penalised sequence's counts are filled in its prefill step (which the test above leaves unchecked)."""
    from serve.engine.penalties import SEEN, OUTPUT, TokenCounts

    counts = TokenCounts(1000, torch.device("cuda:0"))
    counts.rows(["warm-up"], [([1, 2], [3])])  # allocations, kernels loaded
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        rows = counts.rows(["a", "b"], [([5, 5, 7], [9]), ([1], [])])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    first = counts.matrix[rows[0]].tolist()
    assert (first[SEEN][5], first[SEEN][9], first[OUTPUT][9], first[OUTPUT][5]) == (2, 1, 1, 0)


def test_working_ahead_gives_the_same_tokens_as_reading_each_step(engine):
    """ASYNC_SCHEDULING is on by default on CUDA: the rows of a step take the last step's tokens on the device. The
    same requests, each step read before the next is planned, give the same tokens (greedy and seeded rows; the
    grammar and watermark rows, which read their last token on the host first, are left out)."""
    from dataclasses import replace

    from serve.engine import Request, SamplingParams

    prompt = engine.tokenizer("Count the ways:")["input_ids"]
    kinds = every_row_kind()[1:-1] + [SamplingParams(max_new_tokens=40, temperature=1.0, seed=9, ignore_eos=True)]

    def run():
        streams = [engine.submit(Request(prompt_ids=prompt, params=params)) for params in kinds]
        return [[event.token_id for event in stream if event.token_id is not None] for stream in streams]

    assert engine.ahead.enabled, engine.ahead
    before = engine.stats().steps_ahead
    ahead = run()
    assert engine.stats().steps_ahead > before
    report, engine.ahead = engine.ahead, replace(engine.ahead, enabled=False)
    try:
        at_once = run()
    finally:
        engine.ahead = report
    same = [a == b for a, b, params in zip(ahead, at_once, kinds) if params.greedy or params.seed is not None]
    assert len(same) >= 4 and all(same), (ahead, at_once)
