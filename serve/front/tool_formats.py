"""Each model family's own tool-call format: the markers that open a call and how the held text reads as calls.

Every ``parse`` takes the text from the first marker (or the first character of a call-shaped answer) to the end
and returns the calls, or None when that text is not a well-formed list of calls of known tools (it then stays text).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from serve.front.tool_calls import ToolCall, call_from_object, calls_from_values, parse_json_calls, short_call_id

Parse = Callable[[str, frozenset[str]], Optional[list[ToolCall]]]

_DECODER = json.JSONDecoder()
_HERMES_BLOCK = re.compile(r"\s*<tool_call>(?P<body>.*?)(?:</tool_call>|$)", re.DOTALL)
_MISTRAL_CALL = re.compile(r"\s*(?P<name>[A-Za-z0-9_.\-]+)\s*(?:\[CALL_ID\]\s*(?P<id>[A-Za-z0-9]+)\s*)?\[ARGS\]")


@dataclass(frozen=True)
class ToolFormat:
    """A family's format: ``markers`` open a call anywhere in the answer; an answer whose first visible character is
    in ``call_starts`` is held as a possible call; ``block_end`` closes one call (streamed as soon as it closes)."""

    name: str
    markers: tuple[str, ...]
    call_starts: str
    parse: Parse
    block_end: Optional[str] = None
    inner_markers: tuple[str, ...] = ()  # other markers a call holds


def _json_values(text: str, separators: str) -> Optional[list[Any]]:
    """The JSON values one after another in ``text`` (between ``separators`` and whitespace); None if any is cut."""
    values, position = [], 0
    while True:
        while position < len(text) and (text[position].isspace() or text[position] in separators):
            position += 1
        if position == len(text):
            return values
        try:
            value, position = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError:
            return None
        values.append(value)


def parse_hermes(text: str, names: frozenset[str]) -> Optional[list[ToolCall]]:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks (Hermes, Qwen2.5, Qwen3)."""
    calls, position = [], 0
    while position < len(text.rstrip()):
        block = _HERMES_BLOCK.match(text, position)
        if block is None:
            return None
        try:
            call = call_from_object(json.loads(block["body"]), names)
        except json.JSONDecodeError:
            return None
        if call is None:
            return None
        calls.append(call)
        position = block.end()
    return calls or None


def parse_llama3_json(text: str, names: frozenset[str]) -> Optional[list[ToolCall]]:
    """Llama 3.1+ JSON calls, after ``<|python_tag|>`` or alone: ``{"name": ..., "parameters": {...}}``, several
    separated by ``;``."""
    values = _json_values(text.strip().removeprefix("<|python_tag|>"), ";")
    return calls_from_values(values, names) if values is not None else None


def parse_mistral(text: str, names: frozenset[str]) -> Optional[list[ToolCall]]:
    """Mistral's ``[TOOL_CALLS][{"name": ..., "arguments": {...}}]`` and the newer
    ``[TOOL_CALLS]name[ARGS]{...}`` (optionally ``name[CALL_ID]id[ARGS]{...}``), one or more."""
    body = text.strip()
    if not body.startswith("[TOOL_CALLS]"):
        return None
    segments = [segment for segment in body.split("[TOOL_CALLS]") if segment.strip()]
    if len(segments) == 1 and segments[0].lstrip().startswith("["):
        values = _json_values(segments[0], "")
        if values is None or len(values) != 1 or not isinstance(values[0], list):
            return None
        calls = calls_from_values(values[0], names)
        return [ToolCall(call.name, call.arguments, short_call_id()) for call in calls] if calls else None
    calls = [_mistral_named_call(segment, names) for segment in segments]
    return calls if calls and all(calls) else None  # type: ignore[return-value]


def _mistral_named_call(segment: str, names: frozenset[str]) -> Optional[ToolCall]:
    head = _MISTRAL_CALL.match(segment)
    if head is None or head["name"] not in names:
        return None
    values = _json_values(segment[head.end() :], "")
    if values is None or len(values) != 1 or not isinstance(values[0], dict):
        return None
    return ToolCall.of(head["name"], values[0], head["id"] or short_call_id())


def parse_pythonic(text: str, names: frozenset[str]) -> Optional[list[ToolCall]]:
    """A Python list of calls with keyword arguments of literal values (Llama 4, Llama 3.2 small models):
    ``[get_weather(city="Paris"), get_time(zone="CET")]``, optionally inside ``<|python_start|>…<|python_end|>``."""
    body = text.strip().removeprefix("<|python_start|>").removesuffix("<|python_end|>").strip()
    try:
        tree = ast.parse(body, mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = [_python_call(node, names) for node in tree.elts]
    return calls if all(calls) else None  # type: ignore[return-value]


def _python_call(node: ast.expr, names: frozenset[str]) -> Optional[ToolCall]:
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
        return None
    if node.func.id not in names or any(keyword.arg is None for keyword in node.keywords):
        return None
    try:
        arguments = {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
        return ToolCall.of(node.func.id, json.dumps(arguments, ensure_ascii=False))
    except (ValueError, TypeError, SyntaxError):
        return None


JSON = ToolFormat("json", (), "{[`<", parse_json_calls)
HERMES = ToolFormat("hermes", ("<tool_call>",), "{[`", parse_hermes, block_end="</tool_call>")
LLAMA3_JSON = ToolFormat("llama3_json", ("<|python_tag|>",), "{", parse_llama3_json)
MISTRAL = ToolFormat("mistral", ("[TOOL_CALLS]",), "", parse_mistral, inner_markers=("[ARGS]", "[CALL_ID]"))
PYTHONIC = ToolFormat("pythonic", ("<|python_start|>",), "[", parse_pythonic, inner_markers=("<|python_end|>",))
TOOL_FORMATS = {form.name: form for form in (JSON, HERMES, LLAMA3_JSON, MISTRAL, PYTHONIC)}

# What a chat template mentions -> the format its model calls tools in (the first that matches wins).
_TEMPLATE_SIGNS = (
    ("<|python_start|>", PYTHONIC),
    ("<tool_call>", HERMES),
    ("[TOOL_CALLS]", MISTRAL),
    ("<|python_tag|>", LLAMA3_JSON),
)


def tool_format_of_template(template: str) -> ToolFormat:
    """The tool-call format a chat template's model uses; the generic JSON form when the template shows none."""
    return next((form for sign, form in _TEMPLATE_SIGNS if sign in template), JSON)
