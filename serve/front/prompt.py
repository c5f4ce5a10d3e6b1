"""Turn chat messages (and tool definitions) into token ids with the model's chat template, or CHAT_TEMPLATE."""

from __future__ import annotations

import json
import logging
import re
import secrets
from typing import Any, Optional

log = logging.getLogger(__name__)

NO_TEMPLATE = (
    "this model has no chat template; start the server with CHAT_TEMPLATE set to a Jinja chat template "
    "(the text itself or a file path), or send a raw prompt to /v1/completions or /generate"
)


class PromptError(ValueError):
    """The messages cannot be rendered with the chat template."""


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: Optional[list[dict[str, Any]]] = None,
    template: Optional[str] = None,
    variables: Optional[dict[str, Any]] = None,
) -> str:
    """Render messages with ``template`` or the tokenizer's own chat template (jinja's sandbox, as transformers runs
    it).

    Tool definitions go to the template's ``tools`` variable; a template that ignores tools gets them described in
    a system message instead, so the model still knows what it may call. ``variables`` are the request's other
    template variables (``reasoning_effort``, ``enable_thinking``, ...).
    """
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise PromptError(NO_TEMPLATE)
    if tools and "tools" not in template:
        messages = with_tools_described(messages, tools)
    try:
        return tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            chat_template=template,
            add_generation_prompt=True,
            tokenize=False,
            **(variables or {}),
        )
    except Exception as exc:  # jinja raises TemplateError, SecurityError and friends for what the template rejects
        raise PromptError(f"the chat template rejected these messages: {type(exc).__name__}: {exc}") from exc


def with_tools_described(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with the callable functions, and the JSON form a call takes, added to the system message."""
    listing = "\n".join(json.dumps(tool.get("function", tool)) for tool in tools)
    described = (
        f"You can call these functions:\n{listing}\n"
        'To call one, answer with only a JSON object: {"name": <function name>, "arguments": <arguments object>}.'
    )
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0], content=f"{messages[0].get('content') or ''}\n\n{described}")
        return [first] + messages[1:]
    return [{"role": "system", "content": described}] + messages


def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text``; chat prompts already hold their special tokens, raw prompts get BOS if the model uses
    one."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def chars_per_token_bound(tokenizer: Any) -> int:
    """An upper bound on the characters one token of ``tokenizer`` covers: its longest vocabulary entry.

    Vocabulary entries are at least as long as the text they decode to (byte-level entries spell one character per
    byte), so a text longer than ``n`` times this bound has more than ``n`` tokens. A normalizer may shrink text
    before it is split (NFKC composes characters), so the bound is four times larger for tokenizers that have one.
    """
    longest = max((len(piece) for piece in tokenizer.get_vocab()), default=1)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    has_normalizer = backend is not None and getattr(backend, "normalizer", None) is not None
    return max(longest, 1) * (4 if has_normalizer else 1)


def encode_chat(
    tokenizer: Any,
    text: str,
    messages: list[dict[str, Any]],
    tools: Optional[list[dict[str, Any]]] = None,
    template: Optional[str] = None,
    variables: Optional[dict[str, Any]] = None,
) -> list[int]:
    """Token ids of ``text`` (the messages rendered by ``render_chat``); contents are text, never control tokens.

    When a content holds a special-token string (``<|im_start|>`` typed by a user), the template is rendered once
    more with a placeholder for each content, which tells where each content lies in ``text``; such a string there is
    tokenized as the characters it is, while the template's own markers stay special. Prompts without such strings
    (nearly all) are tokenized as they are, with no second render.
    """
    specials = sorted((t.content for t in tokenizer.added_tokens_decoder.values() if t.special), key=len, reverse=True)
    contents = _texts(messages, "")[0]
    if not any(token in content for token in specials for content in contents):  # the usual case: one render
        return encode(tokenizer, text, add_special_tokens=False)
    spans = content_spans(tokenizer, text, messages, tools, template, variables)
    if spans is None:
        return encode(tokenizer, text, add_special_tokens=False)
    found = list(re.finditer("|".join(re.escape(token) for token in specials), text))
    if not any(start <= m.start() < end for m in found for start, end in spans):
        return encode(tokenizer, text, add_special_tokens=False)
    ids: list[int] = []
    position = 0
    for match in found:
        if any(start <= match.start() < end for start, end in spans):
            continue  # user text: tokenized with the text around it
        ids += _as_text(tokenizer, text[position : match.start()])
        ids.append(tokenizer.convert_tokens_to_ids(match.group()))
        position = match.end()
    return ids + _as_text(tokenizer, text[position:])


def content_spans(
    tokenizer: Any,
    text: str,
    messages: list[dict[str, Any]],
    tools: Optional[list[dict[str, Any]]],
    template: Optional[str],
    variables: Optional[dict[str, Any]] = None,
) -> Optional[list[tuple[int, int]]]:
    """Where each message content lies in ``text``; when the template rewrites contents beyond a trim, every
    special-token string that also occurs in some content counts as user text (the safe side)."""
    marker = f"@@content-{secrets.token_hex(8)}-"
    contents, slotted = _texts(messages, marker)
    pieces = re.split(f"{re.escape(marker)}(\\d+)@@", render_chat(tokenizer, slotted, tools, template, variables))
    for strip in (False, True):  # templates that `| trim` contents keep the placeholder as it is
        values = [c.strip() if strip else c for c in contents]
        rendered = [values[int(piece)] if i % 2 else piece for i, piece in enumerate(pieces)]
        if "".join(rendered) == text:
            spans, position = [], 0
            for i, piece in enumerate(rendered):
                if i % 2:
                    spans.append((position, position + len(piece)))
                position += len(piece)
            return spans
    log.warning("the chat template rewrites message contents; special-token strings found in them count as text")
    return [(m.start(), m.end()) for c in contents if c for m in re.finditer(re.escape(c), text)] or None


def _texts(messages: list[dict[str, Any]], marker: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Every text the messages' contents hold (a string content, or the text parts of a list), in order, and the
    messages with text ``i`` replaced by ``{marker}{i}@@``."""
    texts: list[str] = []

    def slot(text: str) -> str:
        texts.append(text)
        return f"{marker}{len(texts) - 1}@@"

    slotted = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            message = dict(message, content=slot(content))
        elif isinstance(content, list):
            parts = [dict(p, text=slot(p["text"])) if p.get("type") == "text" else p for p in content]
            message = dict(message, content=parts)
        slotted.append(message)
    return texts, slotted


def _as_text(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]) if text else []
