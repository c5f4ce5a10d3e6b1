"""OpenAI's response bodies and stream chunks: the pydantic models (what /openapi.json documents) and their builders.

Bodies of bounded size (usage, the usage chunk, a choice's message) are built as models and dumped. The builders
that run once per streamed token, or whose bodies hold a list per token (a completion's log-probabilities), write
the model's dump directly: through the model they cost several times as much (a chunk 5-10x, a 500-token chat
answer with top-5 logprobs ~20 ms). tests/unit/test_response_bodies.py holds every builder equal to its model's dump.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, Field

import serve
from serve.engine.types import FinishReason
from serve.http.schemas.common import absent_when_none

SYSTEM_FINGERPRINT = f"sagemaker-llm-serve-{serve.__version__}"

OpenAIFinishReason = Optional[Literal["stop", "length", "tool_calls"]]
Fingerprint = Annotated[str, Field(description="A string, as TGI sends: text-generation's client requires one")]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose keys and values came from the prefix cache")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: Optional[float]
    bytes: list[int]


class TokenLogprob(BaseModel):
    token: str
    logprob: Optional[float]
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON string")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: Optional[str] = Field(description="null when the answer is tool calls, or the budget ended in thoughts")
    reasoning_content: Optional[str] = absent_when_none(description="A reasoning model's thoughts")
    tool_calls: Optional[list[ToolCall]] = absent_when_none()


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: OpenAIFinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: Fingerprint
    choices: list[ChatChoice]
    usage: Usage


class FunctionDelta(BaseModel):
    name: Optional[str] = absent_when_none()
    arguments: str = Field(description="The next fragment of the arguments' JSON string")


class ToolCallDelta(BaseModel):
    """A call's first delta carries its id, type and name; the next ones its arguments."""

    index: int
    id: Optional[str] = absent_when_none()
    type: Optional[Literal["function"]] = absent_when_none()
    function: FunctionDelta


class ChatDelta(BaseModel):
    """What a chunk adds to its choice: the role (first chunk), thoughts, content, or the tool calls."""

    role: Optional[Literal["assistant"]] = absent_when_none()
    content: Optional[str] = absent_when_none()
    reasoning_content: Optional[str] = absent_when_none()
    tool_calls: Optional[list[ToolCallDelta]] = absent_when_none()


class ChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs]
    finish_reason: OpenAIFinishReason


class ChatCompletionChunk(BaseModel):
    """One chunk of a chat stream; with stream_options.include_usage the last one has no choices, only usage."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: Fingerprint
    choices: list[ChunkChoice]
    usage: Optional[Usage] = absent_when_none()


class CompletionLogprobs(BaseModel):
    """The legacy completions log-probabilities: parallel lists (the echoed prompt's first token has nulls)."""

    tokens: list[str]
    token_logprobs: list[Optional[float]]
    top_logprobs: list[Optional[dict[str, float]]]
    text_offset: list[int]


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs]
    finish_reason: OpenAIFinishReason


class TextCompletion(BaseModel):
    """A text completion, or one chunk of its stream (no usage but on the last chunk with include_usage)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: Fingerprint
    choices: list[TextChoice]
    usage: Optional[Usage] = absent_when_none()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: Optional[str] = absent_when_none("The base model, for a LoRA adapter")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


CHUNK_MODELS: dict[str, type[BaseModel]] = {
    "chat.completion.chunk": ChatCompletionChunk,
    "text_completion": TextCompletion,
}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def openai_finish_reason(reason: Optional[FinishReason], tool_calls: bool = False) -> Optional[str]:
    if reason is None:
        return None
    if reason is FinishReason.LENGTH:
        return "length"
    return "tool_calls" if tool_calls else "stop"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens served from the prefix cache."""
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    ).model_dump()


def _envelope(completion_id: str, obj: str, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields every completion body and chunk starts with, as a dict (the per-token path)."""
    return {
        "id": completion_id,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
    }


def chat_completion(
    completion_id: str, model: str, choices: list[dict[str, Any]], usage_body: dict[str, int]
) -> dict[str, Any]:
    """A complete (non-streaming) ChatCompletion."""
    return {**_envelope(completion_id, "chat.completion", model, choices), "usage": usage_body}


def chat_choice(
    index: int, message: dict[str, Any], finish_reason: Optional[str], logprobs: Optional[dict]
) -> dict[str, Any]:
    """One ChatChoice: the assistant's message (content, or tool_calls and null content) built as its model."""
    message_body = AssistantMessage.model_validate(message).model_dump()
    return {"index": index, "message": message_body, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(
    completion_id: str,
    model: str,
    index: int,
    delta: dict[str, Any],
    finish_reason: Optional[str] = None,
    logprobs: Optional[dict] = None,
) -> dict[str, Any]:
    """One ChatCompletionChunk of a stream, for choice ``index`` (``delta``: a ChatDelta's dump)."""
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return _envelope(completion_id, "chat.completion.chunk", model, [choice])


def text_choice(index: int, text: str, finish_reason: Optional[str], logprobs: Optional[dict] = None) -> dict[str, Any]:
    """One TextChoice."""
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def text_completion(
    completion_id: str, model: str, choices: list[dict[str, Any]], usage_body: Optional[dict] = None
) -> dict[str, Any]:
    """A TextCompletion body, or one chunk of a completions stream."""
    body = _envelope(completion_id, "text_completion", model, choices)
    if usage_body is not None:
        body["usage"] = usage_body
    return body


def usage_chunk(completion_id: str, model: str, obj: str, usage_body: dict[str, Any]) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, only usage."""
    body = _envelope(completion_id, obj, model, [])
    return CHUNK_MODELS[obj].model_validate({**body, "usage": usage_body}).model_dump()


def logprob_entry(text: str, logprob: float, top: list[tuple[str, float]]) -> dict[str, Any]:
    """One TokenLogprob of a chat ``logprobs.content`` list, with its most likely alternatives."""
    return {
        "token": text,
        "logprob": logprob,
        "bytes": list(text.encode("utf-8")),
        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in top],
    }


def completion_logprobs(
    texts: list[str], logprobs: list[Optional[float]], tops: list[Optional[dict[str, float]]], offset: int
) -> dict[str, Any]:
    """CompletionLogprobs: parallel lists, top alternatives as {token: logprob} maps."""
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
