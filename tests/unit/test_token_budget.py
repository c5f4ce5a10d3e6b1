"""The new-token budget of a prompt: each API's default, and the limits' 422s."""

import pytest

from serve.engine.types import Limits
from serve.front.budget import new_token_budget
from serve.front.context import Api
from serve.errors import ValidationFailed

LIMITS = Limits(max_input_tokens=198, max_total_tokens=200, max_batch_total_tokens=1000, max_batch_size=4)


def budget(api: Api, requested=None, prompt_tokens: int = 10, fill_default: int = 1024) -> int:
    return new_token_budget(api, requested, prompt_tokens, LIMITS, fill_default, "inputs")


def test_what_the_body_asks_for_is_what_it_gets():
    assert [budget(api, requested=7) for api in Api] == [7, 7, 7]
    assert budget(Api.COMPLETION, requested=0) == 0  # echo scoring: the prompt only


def test_each_api_has_its_own_default():
    assert budget(Api.TGI) == 100  # TGI's max_new_tokens default
    assert budget(Api.COMPLETION) == 16  # OpenAI's completions max_tokens default
    assert budget(Api.CHAT) == 190  # all the room left, up to DEFAULT_MAX_NEW_TOKENS
    assert budget(Api.CHAT, fill_default=50) == 50


@pytest.mark.parametrize("api", [Api.TGI, Api.COMPLETION])
def test_a_default_that_does_not_fit_is_refused_as_tgi_and_openai_do(api):
    with pytest.raises(ValidationFailed, match="ask for at most 5") as caught:
        budget(api, prompt_tokens=195)
    assert caught.value.param == "max_tokens"
    assert budget(Api.CHAT, prompt_tokens=195) == 5


@pytest.mark.parametrize(
    "prompt_tokens, requested, message",
    [(0, None, "inputs: the prompt is empty"), (199, None, "MAX_INPUT_TOKENS=198"), (10, 191, "at most 190")],
)
def test_limits_are_422s_that_say_which(prompt_tokens, requested, message):
    with pytest.raises(ValidationFailed, match=message):
        budget(Api.CHAT, requested=requested, prompt_tokens=prompt_tokens)
