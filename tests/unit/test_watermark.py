"""TGI's green-list watermark: which tokens are green after a given token, and the bias on exactly those."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from serve.config import SettingsError, load_settings
from serve.engine.types import SamplingParams, Watermark
from serve.engine.watermark import apply_watermarks, green_list


def sequence(watermark, prompt_ids, output_ids=()):
    request = SimpleNamespace(params=SamplingParams(watermark=watermark), prompt_ids=list(prompt_ids))
    return SimpleNamespace(request=request, output_ids=list(output_ids))


def test_the_green_list_is_gamma_of_the_vocabulary_drawn_from_the_previous_token():
    green = green_list(7, 1000, 0.25)
    assert len(green) == 250 and len(set(green.tolist())) == 250
    assert torch.equal(green, green_list(7, 1000, 0.25))  # a detector draws the same list
    assert not torch.equal(green, green_list(8, 1000, 0.25))


def test_only_watermarked_rows_get_delta_on_their_green_list():
    logits = torch.zeros(3, 100)
    mark = Watermark(gamma=0.5, delta=2.0)
    rows = [sequence(mark, [1, 2], [9]), sequence(None, [3]), sequence(mark, [4])]
    apply_watermarks(logits, rows)
    expected_first = torch.zeros(100)
    expected_first[green_list(9, 100, 0.5)] = 2.0  # the last generated token seeds the list
    assert torch.equal(logits[0], expected_first)
    assert torch.equal(logits[1], torch.zeros(100))
    expected_last = torch.zeros(100)
    expected_last[green_list(4, 100, 0.5)] = 2.0  # before any output: the prompt's last token
    assert torch.equal(logits[2], expected_last)


def test_tgis_watermark_settings_are_read_and_checked():
    assert load_settings({"WATERMARK_GAMMA": "0.25"}).watermark == Watermark(gamma=0.25, delta=2.0)
    assert load_settings({}).watermark == Watermark()
    for variable, raw in (("WATERMARK_GAMMA", "0"), ("WATERMARK_GAMMA", "1.5"), ("WATERMARK_DELTA", "-1")):
        with pytest.raises(SettingsError, match=variable):
            load_settings({variable: raw})
