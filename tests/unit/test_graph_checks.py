"""The CUDA graphs' self-check (serve/engine/graphs.py) on the CPU, with a fake capture: each batch bucket's
narrowest and widest shapes are replayed against eager; a shape that differs or fails is dropped with its reason,
the others keep their graphs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from serve.engine.graphs import PROBE_TOLERANCE, _report, checked_shapes, self_check

BATCHES, WIDTHS = [1, 2, 4, 8], [4, 8, 16, 32]


def fake_capture() -> SimpleNamespace:
    """A StaticDecode whose every shape was 'captured' (a replay per shape)."""
    return SimpleNamespace(replay={(batch, width): object() for batch in BATCHES for width in WIDTHS})


def test_every_batch_bucket_is_checked_at_its_narrowest_and_widest_width():
    assert checked_shapes(BATCHES, WIDTHS) == [(1, 4), (1, 32), (2, 4), (2, 32), (4, 4), (4, 32), (8, 4), (8, 32)]
    assert checked_shapes([1, 3], [4]) == [(1, 4), (3, 4)]  # one width: each shape once


def test_a_shape_that_differs_or_fails_is_dropped_and_the_others_kept():
    static = fake_capture()

    def measure(_, shape):
        if shape == (4, 32):
            raise RuntimeError("illegal memory access")
        return 0.5 if shape == (8, 4) else 1e-4

    checked = checked_shapes(BATCHES, WIDTHS)
    errors, dropped = self_check(static, checked, measure)
    assert set(static.replay) == {(b, w) for b in BATCHES for w in WIDTHS} - {(4, 32), (8, 4)}
    assert dropped == [
        "4x32: replay failed: RuntimeError: illegal memory access",
        "8x4: replay differs from eager by 0.5 (relative)",
    ]
    assert set(errors) == set(checked) and errors[(4, 32)] == float("inf")
    shapes = sorted(((b, w) for b in BATCHES for w in WIDTHS), reverse=True)
    report = _report(static, shapes, errors, dropped, 1.0)
    assert report.enabled and len(report.shapes) == 14 and (8, 4) not in report.shapes
    assert report.checked == 8 and report.probe_error == pytest.approx(1e-4) and report.dropped == dropped


def test_graphs_are_off_when_every_checked_shape_fails():
    static = SimpleNamespace(replay={(1, 4): object(), (1, 8): object()})
    errors, dropped = self_check(static, [(1, 4), (1, 8)], lambda _, shape: 2 * PROBE_TOLERANCE)
    report = _report(static, [(1, 8), (1, 4)], errors, dropped, 1.0)
    assert not report.enabled and report.shapes == [] and report.reason.startswith("self-check failed: 1x4: replay")


def test_a_replay_hands_the_model_the_layer_states_it_rewrote():
    """Under an EAGLE-3 head the lean model keeps some layers' states; a replay rewrites, in place, the tensors its
    capture made, and hands those back to the model (an eager forward since may have put others there)."""
    import torch

    from serve.engine.graphs import _replayer

    captured = {0: torch.zeros(2, 4), 3: torch.zeros(2, 4)}
    model = SimpleNamespace(serve_aux_hidden=dict(captured))
    output = torch.zeros(2, 8)
    graph = SimpleNamespace(replay=lambda: [state.fill_(7.0) for state in captured.values()] and output.fill_(1.0))
    replay = _replayer(graph, output, model)
    model.serve_aux_hidden = {0: torch.ones(5, 4)}  # an eager forward of another shape
    assert replay() is output
    assert model.serve_aux_hidden.keys() == {0, 3}
    assert all(model.serve_aux_hidden[index] is captured[index] for index in (0, 3))
    assert float(model.serve_aux_hidden[3].sum()) == 7.0 * 8
    plain = _replayer(graph, output, SimpleNamespace())  # a model that keeps no states: logits only
    assert plain() is output
