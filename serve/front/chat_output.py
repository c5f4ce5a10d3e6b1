"""What a chat answer holds, read from the model's text: thoughts, answer content and tool calls.

The one interface both chat APIs use (chat completions and the Responses API):

- ``model_output_format(tokenizer, settings)`` (``output_format(reasoning_setting, tool_setting, template)``): the
  model's formats, chosen once from REASONING_PARSER / TOOL_CALL_PARSER or, for ``auto``, from what its chat template
  mentions;
- ``OutputFormat.parser(tool_names, forced, opened)``: a fresh ``ChatOutputParser`` per choice, fed text deltas
  (``feed``) and ended with ``finish(truncated)``; each returns an ``OutputDelta`` (reasoning, content, calls);
- ``parse_text(parser, text, truncated)``: the same for a whole answer;
- ``event_text(event, markers)``: an engine token event's text with the family's special marker tokens restored
  (the detokenizer drops special tokens, and ``[TOOL_CALLS]`` or ``<|channel|>`` are special in their vocabularies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Optional, Union

from serve.config import Settings
from serve.engine import TokenEvent
from serve.front import harmony
from serve.front.reasoning import (
    THINK_END,
    THINK_FORMATS,
    THINK_START,
    ThinkFormat,
    ThinkParser,
    grammar_after_thoughts,
    prompt_opens_thoughts,
    think_format_of_template,
)
from serve.front.tool_calls import ToolCall
from serve.front.tool_formats import TOOL_FORMATS, ToolFormat, tool_format_of_template
from serve.front.tool_parsers import ForcedCallParser, ToolCallParser

GPT_OSS = "gpt_oss"
REASONING_PARSERS = ("auto", "none", *THINK_FORMATS, GPT_OSS)
TOOL_CALL_PARSERS = ("auto", *TOOL_FORMATS, GPT_OSS)
PROMPT_TAIL_TOKENS = 16  # the prompt's last tokens, decoded to tell whether its generation prompt opened thoughts


@dataclass
class OutputDelta:
    """What one text delta (or a whole answer) adds: thoughts, answer text, calls completed."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __iadd__(self, other: "OutputDelta") -> "OutputDelta":
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls += other.tool_calls
        return self


@dataclass(frozen=True)
class OutputFormat:
    """The model's formats: its thoughts (``think``, or harmony's channels) and its tool calls."""

    think: Optional[ThinkFormat]
    tools: ToolFormat
    harmony: bool = False

    @property
    def reasoning_parser(self) -> str:
        return GPT_OSS if self.harmony else (self.think.name if self.think else "none")

    @property
    def tool_call_parser(self) -> str:
        return GPT_OSS if self.harmony else self.tools.name

    @property
    def markers(self) -> tuple[str, ...]:
        """The marker strings this model's tokenizer may hold as special tokens."""
        thoughts = (THINK_START, THINK_END) if self.think else ()
        return (*thoughts, *self.tools.markers, *self.tools.inner_markers, *(harmony.MARKERS if self.harmony else ()))

    def opens_thoughts(self, prompt_tail: str) -> bool:
        """Whether a prompt ending in ``prompt_tail`` leaves the model inside its thoughts."""
        return self.think is not None and prompt_opens_thoughts(prompt_tail)

    def constrain(self, grammar: Optional[str], opened: bool) -> Optional[str]:
        """The grammar for a reasoning model's answer, applied after its thoughts (as it is for other models)."""
        return grammar_after_thoughts(grammar, opened) if grammar and self.think else grammar

    def parser(self, tool_names: list[str], forced: bool = False, opened: bool = False) -> "ChatOutputParser":
        """A parser for one choice: ``tool_names`` the tools offered (none: no calls are read), ``forced`` when the
        grammar forces a call, ``opened`` when the prompt opened the thoughts."""
        names = frozenset(tool_names)
        if self.harmony and not forced:
            return ChatOutputParser(harmony_parser=harmony.HarmonyParser(names))
        think = ThinkParser(self.think, opened) if self.think else None
        tools: Union[ToolCallParser, ForcedCallParser, None] = None
        if forced:
            tools = ForcedCallParser(list(tool_names))
        elif names:
            tools = ToolCallParser(self.tools, names)
        return ChatOutputParser(think, tools)


class ChatOutputParser:
    """One choice's answer, read as it streams: thoughts first (when the model has them), then content and calls."""

    def __init__(
        self,
        think: Optional[ThinkParser] = None,
        tools: Union[ToolCallParser, ForcedCallParser, None] = None,
        harmony_parser: Optional[harmony.HarmonyParser] = None,
    ):
        self.think = think
        self.tools = tools
        self.harmony = harmony_parser

    def feed(self, text: str) -> OutputDelta:
        if self.harmony is not None:
            return OutputDelta(*self.harmony.feed(text))
        reasoning, content = self.think.feed(text) if self.think else ("", text)
        return self._content(reasoning, content)

    def finish(self, truncated: bool = False) -> OutputDelta:
        """The rest of the answer; ``truncated`` when the budget (max_tokens) cut it."""
        if self.harmony is not None:
            return OutputDelta(*self.harmony.finish(truncated))
        reasoning, content = self.think.finish(truncated) if self.think else ("", "")
        delta = self._content(reasoning, content)
        if isinstance(self.tools, ForcedCallParser):
            delta += OutputDelta("", *self.tools.finish(truncated))
        elif self.tools is not None:
            delta += OutputDelta("", *self.tools.finish())
        return delta

    def _content(self, reasoning: str, content: str) -> OutputDelta:
        if self.tools is None or not content:
            return OutputDelta(reasoning, content)
        text, calls = self.tools.feed(content)
        return OutputDelta(reasoning, text, calls)


def parse_text(parser: ChatOutputParser, text: str, truncated: bool = False) -> OutputDelta:
    """A whole answer read at once: its thoughts, content and calls."""
    whole = parser.feed(text)
    whole += parser.finish(truncated)
    return whole


@lru_cache(maxsize=8)
def output_format(reasoning_setting: str, tool_setting: str, template: str) -> OutputFormat:
    """The formats REASONING_PARSER and TOOL_CALL_PARSER name; ``auto`` reads them from the chat template."""
    harmony_template = "<|channel|>" in template
    if reasoning_setting == "auto":
        think = None if harmony_template else think_format_of_template(template)
        reasoning_harmony = harmony_template
    else:
        think, reasoning_harmony = THINK_FORMATS.get(reasoning_setting), reasoning_setting == GPT_OSS
    if tool_setting == "auto":
        tools, tools_harmony = tool_format_of_template(template), harmony_template
    else:
        tools, tools_harmony = TOOL_FORMATS.get(tool_setting, TOOL_FORMATS["json"]), tool_setting == GPT_OSS
    return OutputFormat(think, tools, harmony=reasoning_harmony or tools_harmony)


def model_output_format(tokenizer: Any, settings: Settings) -> OutputFormat:
    """The formats of the model served: from the settings, or from CHAT_TEMPLATE or the tokenizer's template."""
    template = template_text(settings.chat_template or getattr(tokenizer, "chat_template", None))
    return output_format(settings.reasoning_parser, settings.tool_call_parser, template)


def template_text(template: Any) -> str:
    """A chat template as text (tokenizers may hold several, by name)."""
    if isinstance(template, dict):
        return "\n".join(str(value) for value in template.values())
    return str(template or "")


@lru_cache(maxsize=8)
def marker_tokens(tokenizer: Any, markers: tuple[str, ...]) -> dict[int, str]:
    """Token id -> marker text, for each marker that is one special token of ``tokenizer``."""
    special = {token_id for token_id, added in tokenizer.added_tokens_decoder.items() if added.special}
    found = {}
    for marker in markers:
        token_id = tokenizer.convert_tokens_to_ids(marker)  # the unknown token's id when the marker is not one
        if token_id in special and tokenizer.convert_ids_to_tokens(token_id) == marker:
            found[token_id] = marker
    return found


def event_text(event: TokenEvent, markers: dict[int, str]) -> str:
    """The event's text, preceded by its marker when the event's token is one (the detokenizer leaves it out)."""
    return markers.get(event.token_id, "") + event.text if event.token_id is not None else event.text


def prompt_tail(tokenizer: Any, prompt_ids: list[int]) -> str:
    """The end of a prompt as text, special tokens kept (to see whether it opened the thoughts)."""
    return tokenizer.decode(prompt_ids[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
