"""The Triton paged decode kernel against the gathering reference (``_decode_attention``), on the CPU through Triton's
interpreter: random block tables, lengths from 1 to 8,192, KV heads 1/2/3/8, head dim 64/128,
float32/bfloat16/float16 (tests/unit/paged_cases.py). The interpreter is slow, so the long case has one KV head and
one sequence. Triton reads TRITON_INTERPRET when it is first imported, so the cases run once in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.paged_cases import TRITON_CASES

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-3}


@pytest.fixture(scope="module")
def errors() -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-m", "tests.unit.paged_cases"],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_kernel_matches_the_gathering_reference(errors, case):
    assert errors[str(case)] <= TOLERANCE[case[-1]]


def test_a_strided_query_reads_only_the_positions_each_sequence_sees(errors):
    assert errors["strided"] <= 1e-5


def test_long_contexts_are_split_and_the_split_count_depends_on_shapes_only():
    from serve.engine.paged_triton import split_count

    assert split_count(1, 8, 8192) > 1  # batch 1 at 8k tokens: many programs per sequence, not 8
    assert split_count(64, 8, 8192) == 1  # a full batch fills the GPU by itself
    assert split_count(1, 8, 64) == 1  # short contexts are never split
