"""OpenAI function calling: tool definitions, tool_choice, the grammar that forces a call, calls sent back to the
template (reading calls from model text: serve.front.chat_output)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BeforeValidator, Field

from serve.errors import ValidationFailed
from serve.http.schemas.common import LenientModel


class FunctionDefinition(LenientModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: Optional[str] = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class Tool(LenientModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(LenientModel):
    name: str


class NamedToolChoice(LenientModel):
    type: Literal["function"] = "function"
    function: NamedFunction


def _bare_name(value: Any) -> Any:
    """TGI also takes a tool's bare name as ``tool_choice`` (``"calc"``): the same as naming it OpenAI's way."""
    if isinstance(value, str) and value not in ("none", "auto", "required"):
        return {"type": "function", "function": {"name": value}}
    return value


ToolChoice = Annotated[Union[Literal["none", "auto", "required"], NamedToolChoice], BeforeValidator(_bare_name)]


def forced_tools(tools: list[Tool], choice: Optional[ToolChoice]) -> list[Tool]:
    """The tools one of which the answer must call: all for "required", one for a named choice, none otherwise."""
    if choice == "required":
        return tools
    if isinstance(choice, NamedToolChoice):
        named = [tool for tool in tools if tool.function.name == choice.function.name]
        if not named:
            known = ", ".join(tool.function.name for tool in tools) or "none"
            raise ValidationFailed(
                f"tool_choice: no tool named {choice.function.name!r} in tools (known: {known})", "tool_choice"
            )
        return named
    return []


def call_schema(tools: list[Tool]) -> dict[str, Any]:
    """A JSON schema for one call of one of ``tools``: {"name": <its name>, "arguments": <its parameters>}."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, "arguments": tool.function.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def template_tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool calls as chat templates expect them: arguments as an object where they parse."""
    rendered = []
    for call in calls:
        function = dict(call.get("function", {}))
        try:
            function["arguments"] = json.loads(function.get("arguments") or "{}")
        except (TypeError, json.JSONDecodeError):
            pass
        rendered.append({**call, "function": function})
    return rendered
