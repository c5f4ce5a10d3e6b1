"""OpenAI Responses API output: the response object, its output items and usage (pydantic models, which
/openapi.json documents), and the builders the route writes them with."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from serve.http.schemas.responses_api import ResponsesRequest

Status = Literal["completed", "incomplete", "in_progress", "failed"]
ItemStatus = Literal["completed", "incomplete", "in_progress"]


class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]
    logprobs: list[Any]


class OutputMessage(BaseModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    status: ItemStatus
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    id: str
    type: Literal["function_call"]
    call_id: str = Field(description="What the function_call_output item of the next request names")
    name: str
    arguments: str = Field(description="The arguments as a JSON string")
    status: ItemStatus


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"]
    text: str


class OutputReasoning(BaseModel):
    id: str
    type: Literal["reasoning"]
    summary: list[Any]
    content: list[ReasoningText] = Field(description="The model's thoughts, apart from its answer")
    status: ItemStatus


OutputItem = Union[OutputMessage, OutputFunctionCall, OutputReasoning]


class InputTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Input tokens whose keys and values came from the prefix cache")


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseErrorDetail(BaseModel):
    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    """A response: its output items and usage, and the request's settings echoed back."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Status
    error: Optional[ResponseErrorDetail]
    incomplete_details: Optional[IncompleteDetails]
    model: str
    output: list[OutputItem]
    usage: Optional[ResponseUsage]
    instructions: Optional[str]
    max_output_tokens: Optional[int]
    temperature: Optional[float]
    top_p: Optional[float]
    tools: list[dict[str, Any]]
    tool_choice: Union[str, dict[str, Any]]
    parallel_tool_calls: bool
    text: dict[str, Any]
    reasoning: dict[str, Any]
    truncation: Literal["disabled"]
    store: Literal[False]
    background: Literal[False]
    previous_response_id: None
    metadata: dict[str, str]


class ResponseStreamEvent(BaseModel):
    """One event of a streamed response: its ``type`` names it (also on the SSE ``event:`` line)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="response.created, response.output_text.delta, ..., response.completed")
    sequence_number: int


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def response_skeleton(req: ResponsesRequest, response_id: str) -> dict[str, Any]:
    """The response before any output: in progress, with the request's settings echoed as OpenAI echoes them."""
    choice = req.tool_choice if req.tool_choice is not None else "auto"
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "model": req.model,
        "output": [],
        "usage": None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "tools": [tool.model_dump(exclude_none=True) for tool in req.tools or []],
        "tool_choice": choice if isinstance(choice, str) else choice.model_dump(),
        "parallel_tool_calls": req.parallel_tool_calls,
        "text": {"format": req.text_format.echoed()},
        "reasoning": {"effort": req.effort, "summary": req.reasoning.summary if req.reasoning else None},
        "truncation": "disabled",
        "store": False,
        "background": False,
        "previous_response_id": None,
        "metadata": dict(req.metadata or {}),
    }


def finished(skeleton: dict[str, Any], output: list[dict[str, Any]], usage_body: dict[str, Any], cut: bool) -> dict:
    """The response once generated: ``cut`` (by max_output_tokens or MAX_TOTAL_TOKENS) makes it incomplete."""
    details = {"reason": "max_output_tokens"} if cut else None
    status = "incomplete" if cut else "completed"
    return {**skeleton, "status": status, "incomplete_details": details, "output": output, "usage": usage_body}


def failed(skeleton: dict[str, Any], output: list[dict[str, Any]], message: str) -> dict[str, Any]:
    """The response of a generation that failed after it began."""
    return {**skeleton, "status": "failed", "error": {"code": "server_error", "message": message}, "output": output}


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def function_call_item(item_id: str, call: dict[str, Any], status: str) -> dict[str, Any]:
    """A function_call item from a chat ``tool_calls`` entry (its id becomes the call_id)."""
    function = call["function"]
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call["id"],
        "name": function["name"],
        "arguments": function["arguments"],
        "status": status,
    }


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def usage(input_tokens: int, output_tokens: int, cached_tokens: int, reasoning_tokens: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }
