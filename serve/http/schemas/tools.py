"""OpenAI function calling: tool definitions, tool_choice, the grammar that forces a call, and reading calls back."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BeforeValidator, Field

from serve.errors import ValidationFailed
from serve.front.tool_calls import ToolCall, parse_json_calls, truncated_call
from serve.front.tool_formats import JSON
from serve.front.tool_parsers import ForcedCallParser, ToolCallParser
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


def _names(tools: list[Tool]) -> frozenset[str]:
    return frozenset(tool.function.name for tool in tools)


def parse_tool_calls(text: str, tools: list[Tool]) -> Optional[list[dict[str, Any]]]:
    """OpenAI ``tool_calls`` when ``text`` is a call (or a list of calls) of known tools; None when it is prose."""
    calls = parse_json_calls(text, _names(tools))
    return [call.openai() for call in calls] if calls else None


def truncated_tool_call(text: str, tools: list[Tool]) -> list[dict[str, Any]]:
    """A forced call cut by max_tokens, as OpenAI returns one: the tool's name and the partial arguments string."""
    return [truncated_call(text, [tool.function.name for tool in tools]).openai()]


def tool_call(name: str, arguments: Any) -> dict[str, Any]:
    """One entry of ``tool_calls``; arguments are sent as a JSON string, as OpenAI does."""
    return ToolCall.of(name, arguments).openai()


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


class ToolCallBuffer:
    """Holds back streamed text that may be a generic JSON call until the end of the choice tells whether it is one
    (serve.front.chat_output reads each family's own format; this is its generic JSON form)."""

    def __init__(self, tools: list[Tool], forced: bool):
        self.tools = tools
        self.forced = forced
        names = [tool.function.name for tool in tools]
        self._parser = ForcedCallParser(names) if forced else ToolCallParser(JSON, frozenset(names))

    def feed(self, text: str) -> str:
        """The part of ``text`` that can be streamed as content now."""
        return self._parser.feed(text)[0]

    def finish(self, truncated: bool = False) -> tuple[str, Optional[list[dict[str, Any]]]]:
        """At the end: (content still held back, tool calls) — one of the two is empty.

        A forced call cut by max_tokens (``truncated``) still comes back as a call, with partial arguments.
        """
        if isinstance(self._parser, ForcedCallParser):
            rest, calls = self._parser.finish(truncated)
        else:
            rest, calls = self._parser.finish()
        return rest, ([call.openai() for call in calls] if calls else None)
