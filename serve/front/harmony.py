"""gpt-oss's harmony format: messages on channels, read as they stream.

An answer is a run of messages, each ``<|channel|>NAME [to=functions.TOOL] [<|constrain|>json]<|message|>BODY``
ended by ``<|end|>``, ``<|call|>`` or ``<|return|>`` (a new message starts with ``<|start|>assistant``). The
``analysis`` channel is the thoughts, ``final`` (and ``commentary`` meant for the user) the answer, and a
``commentary`` message to ``functions.TOOL`` a call of that tool with the body as its arguments.
"""

from __future__ import annotations

import json
import re
from typing import Optional

from serve.front.tool_calls import ToolCall
from serve.front.tool_parsers import held_prefix_length

MESSAGE = "<|message|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")
MARKERS = ("<|channel|>", "<|constrain|>", MESSAGE, *ENDS)
_CHANNEL = re.compile(r"<\|channel\|>\s*(?P<channel>\w+)")
_RECIPIENT = re.compile(r"\bto=functions\.(?P<name>[A-Za-z0-9_.\-]+)")

Parsed = tuple[str, str, list[ToolCall]]  # reasoning, content, calls


class HarmonyParser:
    """Streams the analysis channel as reasoning and the final one as content; reads calls to functions whole."""

    def __init__(self, names: frozenset[str]):
        self.names = names
        self.pending = ""
        self.header: Optional[str] = ""  # the current message's header while it is read; None inside a body
        self.channel = ""
        self.recipient: Optional[str] = None

    def feed(self, text: str) -> Parsed:
        self.pending += text
        reasoning: list[str] = []
        content: list[str] = []
        calls: list[ToolCall] = []
        while self._step(reasoning, content, calls):
            pass
        return "".join(reasoning), "".join(content), calls

    def finish(self, truncated: bool) -> Parsed:
        """The rest of the last message; a budget that ends in a header or a call leaves it out of the answer."""
        rest, self.pending = self.pending, ""
        if self.header is not None:
            return "", ("" if truncated else _without_markers(rest)), []
        if truncated and self.recipient is None:
            rest = ""  # only what may begin an end marker is still held
        return self._body(rest, ended=True)

    def _step(self, reasoning: list[str], content: list[str], calls: list[ToolCall]) -> bool:
        """Read one header or one body's worth of pending text; True when there may be more to read."""
        if self.header is not None:
            if MESSAGE not in self.pending:
                return False
            head, self.pending = self.pending.split(MESSAGE, 1)
            self._open(self.header + head)
            return True
        found = [(self.pending.find(end), end) for end in ENDS if end in self.pending]
        if found:
            position, end = min(found)
            body, self.pending = self.pending[:position], self.pending[position + len(end) :]
            self._collect(self._body(body, ended=True), reasoning, content, calls)
            self.header = ""
            return True
        if self.recipient is None:  # stream the body, holding back what may begin an end marker
            keep = held_prefix_length(self.pending, ENDS)
            body, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
            self._collect(self._body(body, ended=False), reasoning, content, calls)
        return False

    def _open(self, header: str) -> None:
        channel, recipient = _CHANNEL.search(header), _RECIPIENT.search(header)
        self.channel = channel["channel"] if channel else "final"
        self.recipient = recipient["name"] if recipient else None
        self.header = None

    def _body(self, body: str, ended: bool) -> Parsed:
        """What one message body (or the part of it read now) adds: thoughts, answer text or a call."""
        if self.recipient is not None:
            if not ended:
                return "", "", []
            call = self._call(body)
            return ("", "", [call]) if call else ("", body, [])
        if self.channel == "analysis":
            return body, "", []
        return "", body, []

    def _call(self, body: str) -> Optional[ToolCall]:
        if self.recipient not in self.names:
            return None
        try:
            arguments = json.loads(body)
        except json.JSONDecodeError:
            return None
        return ToolCall.of(self.recipient, arguments) if isinstance(arguments, dict) else None

    @staticmethod
    def _collect(parsed: Parsed, reasoning: list[str], content: list[str], calls: list[ToolCall]) -> None:
        reasoning.append(parsed[0])
        content.append(parsed[1])
        calls.extend(parsed[2])


def _without_markers(text: str) -> str:
    for marker in MARKERS:
        text = text.replace(marker, "")
    return text
