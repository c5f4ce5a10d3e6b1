"""The static-shape decode path (what a GPU captures as CUDA graphs), proven on the CPU: bucketed shapes, padded
rows that touch only the scratch block, one device-to-host read per step, seeds independent of the bucket."""

import random
import threading
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from serve.wiring import engine_config
from serve.engine import Engine, Request, SamplingParams
from serve.engine.types import Watermark
from serve.engine.grammar import regex_grammar
from serve.engine.graphs import capture_decode_graphs
from serve.engine.block_manager import SCRATCH_BLOCK
from serve.engine.static_decode import StaticDecode, TableRows, batch_buckets, width_buckets
from serve.loading.loader import load_model
from tests.helpers import wait_for


def test_the_cpu_runs_exact_shapes_and_pads_only_when_asked(engine):
    static = engine._runner.static
    static.pad = False
    try:
        assert static.shape_for(3, 5) == (3, 5)
    finally:
        static.pad = True
    assert static.shape_for(3, 5) == (4, 8)


def test_buckets_cover_every_batch_and_width_up_to_the_cap():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert batch_buckets(10) == [1, 2, 4, 8, 10]
    assert width_buckets(100) == [4, 8, 16, 32, 64, 100] and width_buckets(4) == [4]


@pytest.fixture(scope="module")
def engine(tiny_settings):
    engine = Engine(
        load=lambda: load_model(tiny_settings), config=engine_config(replace(tiny_settings, kv_block_size=4))
    )
    engine.start()
    assert engine.wait_ready(120), engine.load_error
    engine._runner.static.pad = True  # padded buckets, as a GPU runs them (the CPU runs exact shapes otherwise)
    yield engine
    engine.stop()


def tokens(stream):
    return [event.token_id for event in stream if event.token_id is not None]


def counted_steps(engine):
    """Wrap the runner's step to count steps and host reads per step."""
    runner = engine._runner
    step, log = runner.step, []

    def counting(plan):
        before = runner.host_reads
        result = step(plan)
        log.append((bool(plan.prefill), runner.host_reads - before))
        return result

    runner.step = counting
    return log, lambda: setattr(runner, "step", step)


EVERY_ROW_KIND = [
    SamplingParams(max_new_tokens=9, ignore_eos=True),
    SamplingParams(max_new_tokens=9, ignore_eos=True, temperature=0.7, top_p=0.9),
    SamplingParams(
        max_new_tokens=9, ignore_eos=True, temperature=0.8, top_p=0.9, top_k=20, typical_p=0.8, min_p=0.05, seed=3
    ),
    SamplingParams(
        max_new_tokens=9, ignore_eos=True, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.2
    ),
    SamplingParams(max_new_tokens=9, ignore_eos=True, logit_bias=((5, 3.0), (7, -100.0))),
    SamplingParams(max_new_tokens=9, ignore_eos=True, logprobs=3),
    SamplingParams(max_new_tokens=9, ignore_eos=True, watermark=Watermark()),
]
# longer than the others: still decoding when they join, however fast the host makes its first tokens
GRAMMAR_ROW = SamplingParams(max_new_tokens=60, ignore_eos=True, grammar=regex_grammar("[a-z ]{200,900}"))
READS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__")
MOVES = ("to", "__getitem__", "__setitem__")  # host traffic when given a device, or a Python list as an index


def blocking_upload(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether a call would copy pageable host memory to a GPU (a blocking copy there): a Python list as an index,
    a tensor made on or moved to a named device."""
    if name in ("__getitem__", "__setitem__"):
        index = args[0] if isinstance(args[0], tuple) else (args[0],)
        return any(isinstance(part, list) for part in index)
    return "device" in kwargs or any(isinstance(arg, (torch.device, str)) for arg in args)


class HostTraffic(TorchFunctionMode):
    """Records, while active, every read to the host and every upload that would block on a GPU, except while
    ``inside.reading`` (the runner's one read, ``to_host``). A torch function mode sees each tensor method and torch
    function as it is called; patching ``torch.Tensor`` itself instead would leave its type slots changed after the
    test (a 0-d tensor would then count as a sequence for every later ``torch.tensor``)."""

    def __init__(self, outside: list, inside: threading.local):
        super().__init__()
        self.outside, self.inside = outside, inside

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not getattr(self.inside, "reading", False):
            moved = name in (*MOVES, "tensor") and blocking_upload(name, args[1:] if name in MOVES else args, kwargs)
            if name in READS or moved:
                self.outside.append(name)
        return func(*args, **kwargs)


def host_traffic_in_sample(engine, monkeypatch) -> tuple[list[str], list[int]]:
    """Record every read to the host (other than through ``to_host``) and every upload that would block on a GPU
    made while the runner samples; and the number of rows each sample call took."""
    runner, outside, inside, widths = engine._runner, [], threading.local(), []
    sample, to_host = runner.sample, runner.to_host

    def sampling(logits, sequences):
        widths.append(len(sequences))
        with HostTraffic(outside, inside):
            return sample(logits, sequences)

    def reading(tensor):
        inside.reading = True
        try:
            return to_host(tensor)
        finally:
            inside.reading = False

    monkeypatch.setattr(runner, "sample", sampling)
    monkeypatch.setattr(runner, "to_host", reading)
    return outside, widths


def test_one_host_read_per_step_for_every_row_kind_and_no_other_host_traffic(engine, monkeypatch):
    prompt = engine.tokenizer("Count the ways:")["input_ids"]
    outside, widths = host_traffic_in_sample(engine, monkeypatch)
    log, restore = counted_steps(engine)
    try:
        streams = [engine.submit(Request(prompt_ids=prompt, params=GRAMMAR_ROW))]  # first: its matcher compiles
        assert wait_for(lambda: engine.matchers.compiling == 0)
        streams += [engine.submit(Request(prompt_ids=prompt, params=params)) for params in EVERY_ROW_KIND]
        assert [len(tokens(stream)) for stream in streams] == [60] + [9] * len(EVERY_ROW_KIND)
    finally:
        restore()
    decode_steps = [reads for prefill, reads in log if not prefill]
    assert len(decode_steps) >= 8 and set(decode_steps) == {1}
    assert max(widths) == len(EVERY_ROW_KIND) + 1  # a step sampled every kind of row at once
    assert outside == []


def test_a_seed_gives_the_same_tokens_whichever_bucket_it_lands_in(engine):
    prompt = engine.tokenizer("Once upon a time")["input_ids"]
    seeded = Request(
        prompt_ids=prompt, params=SamplingParams(max_new_tokens=12, temperature=1.0, seed=42, ignore_eos=True)
    )
    alone = tokens(engine.submit(seeded))  # batch bucket 1
    others = [
        engine.submit(
            Request(prompt_ids=prompt[:-1] + [i + 5], params=SamplingParams(max_new_tokens=12, ignore_eos=True))
        )
        for i in range(5)
    ]
    together = tokens(engine.submit(replace(seeded, id="again")))  # bucket 8 with the five others
    assert all(len(tokens(stream)) == 12 for stream in others)
    assert together == alone


def test_graph_capture_is_refused_with_a_reason_off_cuda(engine):
    report = capture_decode_graphs(engine._runner.static)
    assert not report.enabled and "no CUDA device" in report.reason and engine._runner.static.replay == {}
    assert engine.graphs is not None and not engine.graphs.enabled


def test_every_captured_shape_can_be_loaded_with_a_probe_that_touches_only_scratch(engine):
    static = engine._runner.static
    cache = engine._runner.cache
    before = [keys[1:].clone() for keys in cache.keys]  # every block but scratch
    for batch, width in [(1, static.widths[-1]), (static.batches[-1], static.widths[0]), (2, static.widths[1])]:
        static.load_probe(batch, width)
        logits = static.run(batch, width)
        assert logits.shape == (batch, engine.loaded.model.config.vocab_size) and logits.isfinite().all()
    assert all((keys[1:] == old).all() for keys, old in zip(cache.keys, before))


def test_a_step_writes_only_the_table_entries_that_changed():
    rows, width = TableRows(4, 8), 8
    assert rows.changes([[3, 4], [5]], 2) == ([0, 1, width], [3, 4, 5])  # first step: every entry
    assert rows.changes([[3, 4], [5]], 2) == ([], [])  # nothing changed: nothing written
    assert rows.changes([[3, 4, 9], [5]], 2) == ([2], [9])  # a new block: one entry
    assert rows.changes([[3, 4, 9], [7, 8]], 2) == ([width, width + 1], [7, 8])  # another sequence on row 1
    assert rows.changes([[3, 6]], 3) == ([1, 2, width, width + 1], [6, SCRATCH_BLOCK] + [SCRATCH_BLOCK] * 2)


def test_persistent_tables_match_tables_built_afresh_over_random_steps():
    static = StaticDecode(None, SimpleNamespace(block_size=4), torch.device("cpu"), max_batch=8, max_blocks=16)
    static.pad = True
    randomly, live = random.Random(5), {}
    for _ in range(200):
        for name in randomly.sample(sorted(live), k=randomly.randint(0, min(2, len(live)))):
            del live[name]  # finished
        while len(live) < randomly.randint(1, 8):
            live[randomly.random()] = [randomly.randint(1, 99) for _ in range(randomly.randint(1, 6))]
        for table in live.values():
            if randomly.random() < 0.3 and len(table) < 16:
                table.append(randomly.randint(1, 99))  # a new block, in place
            elif randomly.random() < 0.1 and len(table) > 1:
                del table[randomly.randint(1, len(table) - 1) :]  # shrunk (rejected proposals)
        order = randomly.sample(list(live.values()), k=len(live))
        batch, width = static.load([(1, 0, table) for table in order])
        expected = [table + [SCRATCH_BLOCK] * (width - len(table)) for table in order]
        expected += [[SCRATCH_BLOCK] * width] * (batch - len(order))
        assert static.tables[:batch, :width].tolist() == expected
