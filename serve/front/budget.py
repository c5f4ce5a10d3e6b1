"""How many new tokens a prompt may get: the limits' checks and each API's default, decided in one place."""

from __future__ import annotations

from typing import Optional

from serve.engine.types import Limits
from serve.front.context import Api
from serve.errors import ValidationFailed

TGI_DEFAULT_MAX_NEW_TOKENS = 100  # TGI's own default for parameters.max_new_tokens
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions' max_tokens
API_DEFAULTS = {Api.TGI: TGI_DEFAULT_MAX_NEW_TOKENS, Api.COMPLETION: COMPLETIONS_DEFAULT_MAX_TOKENS}


def new_token_budget(
    api: Api, requested: Optional[int], prompt_tokens: int, limits: Limits, fill_default: int, prompt_field: str
) -> int:
    """The new-token budget of a prompt: 422 when it is empty, too long, or leaves no room for what is asked.

    ``requested`` is what the body sets (None when it sets nothing). TGI then asks for 100 tokens and OpenAI's text
    completions for 16, as those APIs do (a 422 when they do not fit); a chat completion gets all the room left,
    at most ``fill_default`` (DEFAULT_MAX_NEW_TOKENS).
    """
    check_prompt_length(prompt_tokens, limits, prompt_field)
    asked = requested if requested is not None else API_DEFAULTS.get(api)
    room = limits.max_total_tokens - prompt_tokens
    if asked is not None and asked > room:
        raise ValidationFailed(
            f"max_tokens: {asked} new tokens plus the {prompt_tokens} prompt tokens exceed "
            f"MAX_TOTAL_TOKENS={limits.max_total_tokens}; ask for at most {room}",
            "max_tokens",
        )
    return min(room, fill_default) if asked is None else asked


def check_prompt_length(prompt_tokens: int, limits: Limits, prompt_field: str) -> None:
    """422 naming ``prompt_field`` when the prompt is empty or longer than MAX_INPUT_TOKENS."""
    if prompt_tokens == 0:
        raise ValidationFailed(f"{prompt_field}: the prompt is empty", prompt_field)
    if prompt_tokens > limits.max_input_tokens:
        raise ValidationFailed(
            f"{prompt_field}: the prompt has {prompt_tokens} tokens, more than MAX_INPUT_TOKENS="
            f"{limits.max_input_tokens}",
            prompt_field,
        )
