"""On CUDA: under SPECULATIVE=eagle3 the decode and verify steps replay their CUDA graphs, and the head still reads
the target's states of each replay: its proposals are those it makes with graphs off, and the text is the same as
without speculation (skipped without a GPU)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.unit.test_speculative_eagle3 import PROMPTS, recording, run_all, with_head, write_head
from tests.unit.test_speculative_draft import start

pytestmark = pytest.mark.gpu


def proposals_and_text(settings, prompts):
    engine = start(settings)
    try:
        made = recording(engine)
        results = run_all(engine, prompts)
        return made, results, engine.stats(), engine.graphs
    finally:
        engine.stop()


def test_graph_replays_keep_the_heads_states(tiny_settings, tiny_engine, tmp_path):
    from transformers import AutoConfig

    head = write_head(tmp_path / "head", AutoConfig.from_pretrained(tiny_settings.model_id))
    prompts = [tiny_engine.tokenizer(text)["input_ids"] for text in PROMPTS]
    plain = run_all(tiny_engine, prompts)
    graphed, graphed_text, stats, graphs = proposals_and_text(with_head(tiny_settings, head), prompts)
    eager, eager_text, _, _ = proposals_and_text(with_head(replace(tiny_settings, cuda_graphs=False), head), prompts)
    assert graphs.enabled and stats.step_paths[0] > 0  # steps replayed graphs under the head
    assert graphed_text == eager_text == plain
    same = sum(1 for one, other in zip(graphed, eager) if one == other)
    assert len(graphed) == len(eager) and same >= 0.9 * len(eager)  # stale states would agree on next to none
