"""OpenAI function calling: tool definitions, tool_choice, the grammar that forces a call, and reading calls back."""

from __future__ import annotations

import json
import re
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BeforeValidator, Field

from serve.errors import ValidationFailed
from serve.http.schemas.common import LenientModel

# What models wrap calls in, stripped before the JSON is read: Hermes/Qwen tags and markdown fences.
_WRAPPERS = re.compile(r"^\s*(?:<tool_call>|```(?:json)?)\s*|\s*(?:</tool_call>|```)\s*$")


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


def parse_tool_calls(text: str, tools: list[Tool]) -> Optional[list[dict[str, Any]]]:
    """OpenAI ``tool_calls`` when ``text`` is a call (or a list of calls) of known tools; None when it is prose."""
    try:
        parsed = json.loads(_WRAPPERS.sub("", text))
    except json.JSONDecodeError:
        return None
    calls = parsed if isinstance(parsed, list) else [parsed]
    names = {tool.function.name for tool in tools}
    if not calls or not all(_is_call(call, names) for call in calls):
        return None
    return [tool_call(call["name"], call.get("arguments", call.get("parameters", {}))) for call in calls]


# A prefix of the forced-call envelope {"name": "<name>", "arguments": <arguments>}, as far as it got.
_ENVELOPE = re.compile(
    r'^\s*\{\s*"name"\s*:\s*"(?P<name>[^"]*)(?P<closed>"\s*,\s*"arguments"\s*:\s*(?P<arguments>.*))?', re.DOTALL
)


def truncated_tool_call(text: str, tools: list[Tool]) -> list[dict[str, Any]]:
    """A forced call cut by max_tokens, as OpenAI returns one: the tool's name and the partial arguments string.

    ``text`` is a prefix of ``{"name": <name>, "arguments": <arguments>}`` (what the forcing grammar produces);
    the tool is the one whose name the prefix names (or begins), else the first forced tool.
    """
    match = _ENVELOPE.match(text)
    name = match["name"] if match else ""
    exact = [tool for tool in tools if tool.function.name == name and match["closed"]] if match else []
    begun = [tool for tool in tools if tool.function.name.startswith(name)]
    tool = (exact or begun or tools)[0]
    arguments = match["arguments"] if match and match["closed"] else ""
    return [tool_call(tool.function.name, arguments)]


def _is_call(call: Any, names: set[str]) -> bool:
    return isinstance(call, dict) and call.get("name") in names


def tool_call(name: str, arguments: Any) -> dict[str, Any]:
    """One entry of ``tool_calls``; arguments are sent as a JSON string, as OpenAI does."""
    encoded = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": encoded}}


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
    """Holds back streamed text that may be a tool call until the end of the choice tells whether it is one."""

    def __init__(self, tools: list[Tool], forced: bool):
        self.tools = tools
        self.forced = forced
        self.held = ""
        self.holding: Optional[bool] = True if forced else None  # None: undecided until the first visible character

    def feed(self, text: str) -> str:
        """The part of ``text`` that can be streamed as content now."""
        if self.holding is False:
            return text
        self.held += text
        if self.holding is None:
            visible = self.held.lstrip()
            if not visible:
                return ""
            self.holding = visible[0] in "{[<`"
            if not self.holding:
                text, self.held = self.held, ""
                return text
        return ""

    def finish(self, truncated: bool = False) -> tuple[str, Optional[list[dict[str, Any]]]]:
        """At the end: (content still held back, tool calls) — one of the two is empty.

        A forced call cut by max_tokens (``truncated``) still comes back as a call, with partial arguments.
        """
        calls = parse_tool_calls(self.held, self.tools) if self.held else None
        if calls is None and truncated and self.forced:
            calls = truncated_tool_call(self.held, self.tools)
        return ("" if calls else self.held), calls
