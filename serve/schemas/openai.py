"""OpenAI chat and text completion requests, and the response bodies and stream chunks we send back."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import Field

from serve.engine.types import FinishReason, SamplingParams
from serve.errors import ValidationFailed
from serve.schemas.common import LenientModel, SamplingFields, normalize_stop

OPENAI_DEFAULT_TEMPERATURE = 1.0


class TextPart(LenientModel):
    """A content part; only text parts are understood by a text-only model."""

    type: Literal["text"]
    text: str


class ChatMessage(LenientModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None

    def as_template_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it: role and plain-text content."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content or [])
        return {"role": self.role, "content": content}


class StreamOptions(LenientModel):
    include_usage: bool = False


class _OpenAIRequest(SamplingFields):
    stream_options: Optional[StreamOptions] = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_sampling_params(self, max_new_tokens: int) -> SamplingParams:
        """Engine parameters; OpenAI's defaults are temperature 1 and top_p 1 when not given."""
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=OPENAI_DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=max(self.top_k or 0, 0),
            repetition_penalty=self.repetition_penalty or 1.0,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.seed,
            stop=normalize_stop(self.stop),
            ignore_eos=self.ignore_eos,
        )


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_OpenAIRequest):
    prompt: Union[str, list[str]]
    echo: bool = False

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens if self.max_tokens is not None else 16  # OpenAI's completions default

    @property
    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValidationFailed("prompt: send one prompt per request (a list must hold exactly one string)", "prompt")
        return self.prompt[0]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def openai_finish_reason(reason: Optional[FinishReason]) -> Optional[str]:
    return None if reason is None else ("length" if reason is FinishReason.LENGTH else "stop")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(completion_id: str, model: str, text: str, reason: FinishReason, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A complete (non-streaming) chat.completion body."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": openai_finish_reason(reason),
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(completion_id: str, model: str, delta: dict[str, Any], reason: Optional[FinishReason] = None) -> dict[str, Any]:
    """One chat.completion.chunk of a stream."""
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": openai_finish_reason(reason)}],
    }


def text_completion(completion_id: str, model: str, text: str, reason: Optional[FinishReason], usage_body: Optional[dict] = None) -> dict[str, Any]:
    """A text_completion body, or one chunk of a completions stream (reason None mid-stream)."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": openai_finish_reason(reason)}],
    }
    if usage_body is not None:
        body["usage"] = usage_body
    return body


def usage_chunk(completion_id: str, model: str, obj: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, only usage."""
    return {
        "id": completion_id,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }
