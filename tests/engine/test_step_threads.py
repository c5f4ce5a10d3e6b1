"""On the CPU a step's torch threads follow its size: decode leaves a core to HTTP, long prompt chunks take all."""

from serve.engine.runner import HEAVY_STEP_TOKENS, step_threads
from serve.engine.scheduler import StepPlan


def plan(decoding: int, chunks: list[int]) -> StepPlan:
    return StepPlan(decode=[object()] * decoding, prefill=[(object(), count) for count in chunks])


def test_decode_steps_are_light_and_long_prompt_chunks_heavy():
    assert step_threads(plan(32, []), light=1, heavy=2) == 1
    assert step_threads(plan(4, [16]), light=1, heavy=2) == 1
    assert step_threads(plan(0, [HEAVY_STEP_TOKENS]), light=1, heavy=2) == 2
    assert step_threads(plan(8, [HEAVY_STEP_TOKENS - 8]), light=1, heavy=2) == 2


def test_a_fixed_count_never_switches():
    assert step_threads(plan(1, []), light=2, heavy=2) == step_threads(plan(0, [512]), light=2, heavy=2) == 2
