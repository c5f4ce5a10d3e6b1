"""Reasoning models' thoughts, apart from their answer: ``<think>…</think>`` (DeepSeek-R1, Qwen3, QwQ) streamed as
reasoning, the rest as content; and the grammar that constrains only what follows the thoughts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from serve.front.tool_parsers import held_prefix_length

THINK_START, THINK_END = "<think>", "</think>"
# Whitespace between the thoughts and a constrained answer (the grammar's own JSON allows none of its own).
_GAP = r"/[ \t\r\n]*/"
_THOUGHTS = "thoughts[lazy]: /(?s:.*)<\\/think>/"  # lazy: the thoughts end at the first end marker


@dataclass(frozen=True)
class ThinkFormat:
    """``<think>`` families: ``name`` as REASONING_PARSER spells it; ``thoughts_first``: an answer that shows no
    marker is all thoughts (DeepSeek-R1's templates open the thoughts in the prompt)."""

    name: str
    thoughts_first: bool


DEEPSEEK_R1 = ThinkFormat("deepseek_r1", thoughts_first=True)
QWEN3 = ThinkFormat("qwen3", thoughts_first=False)
THINK_FORMATS = {form.name: form for form in (DEEPSEEK_R1, QWEN3)}


def think_format_of_template(template: str) -> Optional[ThinkFormat]:
    """Qwen3 when the template mentions thoughts and ``enable_thinking``, DeepSeek-R1 when it mentions thoughts only."""
    if THINK_END not in template and THINK_START not in template:
        return None
    return QWEN3 if "enable_thinking" in template else DEEPSEEK_R1


def prompt_opens_thoughts(prompt_tail: str) -> bool:
    """Whether the rendered prompt ends inside the thoughts (its generation prompt wrote ``<think>``)."""
    return prompt_tail.rfind(THINK_START) > prompt_tail.rfind(THINK_END)


class ThinkParser:
    """Splits streamed text into (reasoning, content) at ``</think>``; a marker split across deltas is held back."""

    def __init__(self, form: ThinkFormat, opened: bool):
        self.state = "thoughts" if opened or form.thoughts_first else "start"
        self.pending = ""
        self.thoughts_started = False  # a character of the thoughts has been sent
        self.answer_started = False

    def feed(self, text: str) -> tuple[str, str]:
        self.pending += text
        if self.state == "start":
            self._read_start()
        if self.state == "thoughts":
            return self._read_thoughts()
        if self.state == "answer":
            return "", self._answer()
        return "", ""

    def finish(self, truncated: bool) -> tuple[str, str]:
        """The rest; a budget that ends in the thoughts drops what may be half an end marker."""
        rest, self.pending = self.pending, ""
        if self.state == "thoughts":
            return ("" if truncated else rest), ""
        if self.state == "answer":
            return "", (rest.lstrip() if not self.answer_started else rest)
        return "", rest

    def _read_start(self) -> None:
        visible = self.pending.lstrip()
        if visible.startswith(THINK_START):
            self.pending, self.state = visible[len(THINK_START) :], "thoughts"
        elif visible and not THINK_START.startswith(visible):
            self.state, self.answer_started = "answer", True

    def _read_thoughts(self) -> tuple[str, str]:
        if not self.thoughts_started and self.pending.lstrip().startswith(THINK_START):
            self.pending = self.pending.lstrip()[len(THINK_START) :]  # the marker the prompt already wrote, again
        end = self.pending.find(THINK_END)
        if end < 0:
            keep = max(held_prefix_length(self.pending, (THINK_END,)), self._start_prefix())
            thoughts, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
            self.thoughts_started = self.thoughts_started or bool(thoughts)
            return thoughts, ""
        thoughts, self.pending = self.pending[:end], self.pending[end + len(THINK_END) :]
        self.state = "answer"
        return thoughts, self._answer()

    def _start_prefix(self) -> int:
        """Held while the very first characters of the thoughts may still be a repeated ``<think>``."""
        visible = self.pending.lstrip()
        opening = not self.thoughts_started and (not visible or THINK_START.startswith(visible))
        return len(self.pending) if opening else 0

    def _answer(self) -> str:
        """Answer text: the whitespace between the thoughts and the answer is dropped."""
        if not self.answer_started:
            self.pending = self.pending.lstrip()
            if not self.pending:
                return ""
            self.answer_started = True
        text, self.pending = self.pending, ""
        return text


def grammar_after_thoughts(grammar: str, opened: bool) -> str:
    """``grammar`` (llguidance's JSON grammar text) applied only after the thoughts: ``<think>…</think>`` first
    (required when the prompt opened the thoughts, else optional), then whitespace, then the answer's grammar."""
    inner = json.loads(grammar)
    grammars = inner["grammars"]
    first = grammars[0].get("name") or "answer"
    grammars[0]["name"] = first
    head = "thoughts" if opened else f'("{THINK_START}" thoughts {_GAP})?'
    gap = f" {_GAP}" if opened else ""
    lark = f"start: {head}{gap} @{first}\n{_THOUGHTS}\n"
    return json.dumps({**inner, "grammars": [{"name": "after_thoughts", "lark_grammar": lark}, *grammars]})
