"""A Responses API request as the chat completion body that generates it: its input items as chat messages (earlier
turns' function calls as the assistant's ``tool_calls``, their outputs as tool messages), its tools, tool choice,
text format and reasoning effort in the chat body's spelling."""

from __future__ import annotations

from typing import Any

from serve.errors import ValidationFailed
from serve.http.schemas.responses_api import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    MessageItem,
    ResponsesRequest,
)


def chat_messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The conversation as chat completion messages: ``instructions`` first (as a system message), developer
    messages as system messages, function calls as the assistant's ``tool_calls``, their outputs as tool messages."""
    messages: list[dict[str, Any]] = []
    if req.instructions is not None:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return messages + [{"role": "user", "content": req.input}]
    names: dict[str, str] = {}  # call_id -> the function's name, for the tool message that answers it
    for index, item in enumerate(req.input):
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": item.chat_content})
        elif isinstance(item, FunctionCallItem):
            names[item.call_id] = item.name
            _add_call(messages, item)
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(_tool_message(item, names, index))
    return messages


def _add_call(messages: list[dict[str, Any]], item: FunctionCallItem) -> None:
    """Add a call to the assistant message just before it (calls of one turn share it), or start one."""
    call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})


def _tool_message(item: FunctionCallOutputItem, names: dict[str, str], index: int) -> dict[str, Any]:
    """The tool message of a call's output; the call must come earlier in the input."""
    if item.call_id not in names:
        field = f"input[{index}].call_id"
        raise ValidationFailed(f"{field}: no function_call with call_id {item.call_id!r} comes before it", field)
    return {"role": "tool", "tool_call_id": item.call_id, "name": names[item.call_id], "content": item.text}


def chat_body(req: ResponsesRequest) -> dict[str, Any]:
    """The chat completion body that generates this response (validated again by the chat validation step)."""
    body: dict[str, Any] = {"model": req.model, "messages": chat_messages(req), "stream": req.stream}
    optional = {
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "prompt_cache_key": req.prompt_cache_key,
        "reasoning_effort": req.effort,
    }
    body.update({key: value for key, value in optional.items() if value is not None})
    if req.tools:
        body["tools"] = [tool.chat_tool() for tool in req.tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        body["tool_choice"] = (
            {"type": "function", "function": {"name": choice.name}} if isinstance(choice, FunctionChoice) else choice
        )
    if req.text_format.type != "text":
        body["response_format"] = req.text_format.response_format()
    return body
