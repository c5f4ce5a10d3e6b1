"""Which error style a path gets (serve.errors.error_style), as error responses and stream events use it."""

from __future__ import annotations

import pytest

from serve.errors import ErrorStyle, GenerationFailed, NotReady, ValidationFailed, error_body, error_style


@pytest.mark.parametrize(
    ("path", "style"),
    [
        ("/v1/chat/completions", ErrorStyle.OPENAI),
        ("/v1/completions", ErrorStyle.OPENAI),
        ("/v1/models", ErrorStyle.OPENAI),
        ("/invocations", ErrorStyle.TGI),
        ("/generate", ErrorStyle.TGI),
        ("/", ErrorStyle.TGI),
        ("/ping", ErrorStyle.TGI),
        ("/v1", ErrorStyle.TGI),
    ],
)
def test_openai_style_on_v1_tgi_style_elsewhere(path, style):
    assert error_style(path) is style


def test_a_stream_keeps_the_style_of_its_api_on_any_path():
    assert error_style("/invocations", ErrorStyle.OPENAI) is ErrorStyle.OPENAI
    assert error_style("/invocations", ErrorStyle.TGI) is ErrorStyle.TGI


def test_invalid_requests_are_400_openai_style_and_422_tgi_style():
    error = ValidationFailed("n: too big", "n")
    assert error_body(error, "/v1/completions") == (error.openai_body(), 400)
    assert error_body(error, "/generate") == (error.tgi_body(), 422)
    assert error_body(error, "/invocations", ErrorStyle.OPENAI) == (error.openai_body(), 400)


@pytest.mark.parametrize("error", [NotReady("loading"), GenerationFailed("boom")])
def test_other_statuses_are_the_same_in_both_styles(error):
    assert error_body(error, "/v1/chat/completions")[1] == error_body(error, "/generate")[1] == error.status
