"""Streamed answers with tool calls: content goes out at once, text that may be a call is held until it reads as one.

``ToolCallParser`` finds calls in the family's own format (serve.front.tool_formats) in free text
(``tool_choice: "auto"``); ``ForcedCallParser`` reads the one call a forcing grammar produced. Both take text
deltas (``feed``) and end with ``finish``; each returns (content to send now, calls completed now).
"""

from __future__ import annotations

from typing import Optional

from serve.front.tool_calls import ToolCall, parse_json_calls, truncated_call
from serve.front.tool_formats import ToolFormat

Parsed = tuple[str, list[ToolCall]]


def held_prefix_length(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` may begin one of ``markers`` (held back until the next delta)."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


class ToolCallParser:
    """Finds calls of ``names`` in ``form``'s format in a streamed answer; malformed calls come back as text."""

    def __init__(self, form: ToolFormat, names: frozenset[str]):
        self.form = form
        self.names = names
        self.pending = ""  # text not yet sent: a possible marker's beginning, or a held call
        self.holding = False  # the pending text is a call being read
        self.started = False  # a visible character of the answer has been seen

    def feed(self, text: str) -> Parsed:
        self.pending += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self.holding:
                calls += self._closed_blocks(content)
                if self.holding:
                    return "".join(content), calls
            if not self._scan(content):
                return "".join(content), calls

    def finish(self) -> Parsed:
        """The rest: the held call(s) read as calls, or as text when they are not well formed."""
        rest, self.pending = self.pending, ""
        if not self.holding or not rest.strip():
            return rest, []
        calls = self.form.parse(rest, self.names) or parse_json_calls(rest, self.names)
        return ("", calls) if calls else (rest, [])

    def _scan(self, content: list[str]) -> bool:
        """Send the text before a call; True when a call starts in the pending text (now held)."""
        if not self.started:
            visible = self.pending.lstrip()
            if not visible:
                return False
            self.started = True
            if visible[0] in self.form.call_starts:
                self.holding = True
                return True
        found = [(self.pending.find(m), m) for m in self.form.markers if m in self.pending]
        if found:
            start = min(found)[0]
            content.append(self.pending[:start])
            self.pending, self.holding = self.pending[start:], True
            return True
        keep = held_prefix_length(self.pending, self.form.markers)
        content.append(self.pending[: len(self.pending) - keep])
        self.pending = self.pending[len(self.pending) - keep :]
        return False

    def _closed_blocks(self, content: list[str]) -> list[ToolCall]:
        """Calls whose closing marker has come (formats with one); text that follows them is scanned again."""
        end = self.form.block_end
        calls: list[ToolCall] = []
        while end and end in self.pending:
            block, self.pending = self.pending.split(end, 1)
            block += end
            parsed = self.form.parse(block, self.names)
            if parsed:
                calls += parsed
            else:
                content.append(block)
            visible = self.pending.lstrip()
            marker = self.form.markers[0]
            if visible and not visible.startswith(marker[: len(visible)]):
                self.holding = False
                return calls
        return calls


class ForcedCallParser:
    """The answer of a forced call (``tool_choice`` required or named): ``{"name": ..., "arguments": ...}`` as the
    forcing grammar writes it, held whole; cut by max_tokens it still comes back as a call with partial arguments."""

    def __init__(self, names: list[str]):
        self.names = names
        self.held = ""

    def feed(self, text: str) -> Parsed:
        self.held += text
        return "", []

    def finish(self, truncated: bool = False) -> Parsed:
        calls: Optional[list[ToolCall]] = parse_json_calls(self.held, frozenset(self.names)) if self.held else None
        if calls is None and truncated:
            calls = [truncated_call(self.held, self.names)]
        return ("", calls) if calls else (self.held, [])
