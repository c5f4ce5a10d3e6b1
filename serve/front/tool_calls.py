"""One tool call read back from model text, and the generic JSON form calls take under a forcing grammar."""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Optional

# What models wrap a JSON call in, stripped before it is read: Hermes/Qwen tags and markdown fences.
_WRAPPERS = re.compile(r"^\s*(?:<tool_call>|```(?:json)?)\s*|\s*(?:</tool_call>|```)\s*$")
# A prefix of the forced-call envelope {"name": "<name>", "arguments": <arguments>}, as far as it got.
_ENVELOPE = re.compile(
    r'^\s*\{\s*"name"\s*:\s*"(?P<name>[^"]*)(?P<closed>"\s*,\s*"arguments"\s*:\s*(?P<arguments>.*))?', re.DOTALL
)
_ID_ALPHABET = string.ascii_letters + string.digits


def openai_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


def short_call_id() -> str:
    """Nine letters and digits: the only ids Mistral's chat templates accept back in the next turn."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


@dataclass(frozen=True)
class ToolCall:
    """A complete call: its id, the function's name and its arguments as a JSON string (as OpenAI sends them)."""

    name: str
    arguments: str
    id: str = field(default_factory=openai_call_id)

    @classmethod
    def of(cls, name: str, arguments: Any, call_id: Optional[str] = None) -> "ToolCall":
        """A call whose arguments are an object (encoded here) or already a JSON string."""
        encoded = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return cls(name, encoded, call_id or openai_call_id())

    def openai(self) -> dict[str, Any]:
        """The entry of a message's ``tool_calls``."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def stream_deltas(self, index: int) -> list[dict[str, Any]]:
        """The call as streamed ``tool_calls`` deltas: id, type and name first, then the arguments."""
        head = {"index": index, "id": self.id, "type": "function", "function": {"name": self.name, "arguments": ""}}
        return [head, {"index": index, "function": {"arguments": self.arguments}}]


def call_from_object(value: Any, names: frozenset[str], call_id: Optional[str] = None) -> Optional[ToolCall]:
    """A call from ``{"name": ..., "arguments"|"parameters": {...}}`` naming a known tool; None for anything else."""
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(arguments, (dict, str)):
        return None
    return ToolCall.of(value["name"], arguments, call_id)


def calls_from_values(values: list[Any], names: frozenset[str]) -> Optional[list[ToolCall]]:
    """Every value as a call, or None when any is not one (a partly valid answer is text, not calls)."""
    calls = [call_from_object(value, names) for value in values]
    if not calls or any(call is None for call in calls):
        return None
    return calls  # type: ignore[return-value]


def parse_json_calls(text: str, names: frozenset[str]) -> Optional[list[ToolCall]]:
    """The calls when ``text`` is one JSON call or a list of them (tags and fences allowed); None when it is prose."""
    try:
        parsed = json.loads(_WRAPPERS.sub("", text))
    except json.JSONDecodeError:
        return None
    return calls_from_values(parsed if isinstance(parsed, list) else [parsed], names)


def truncated_call(text: str, names: list[str]) -> ToolCall:
    """A forced call cut by max_tokens, as OpenAI returns one: the tool's name and the partial arguments string.

    ``text`` is a prefix of ``{"name": <name>, "arguments": <arguments>}`` (what the forcing grammar produces);
    the tool is the one whose name the prefix names (or begins), else the first forced tool.
    """
    match = _ENVELOPE.match(text)
    name = match["name"] if match else ""
    exact = [known for known in names if known == name and match["closed"]] if match else []
    begun = [known for known in names if known.startswith(name)]
    chosen = (exact or begun or names)[0]
    return ToolCall(chosen, match["arguments"] if match and match["closed"] else "")
