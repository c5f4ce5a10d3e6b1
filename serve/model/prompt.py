"""Turn chat messages (and tool definitions) into token ids with the model's chat template, or CHAT_TEMPLATE."""

from __future__ import annotations

import json
from typing import Any, Optional

NO_TEMPLATE = (
    "this model has no chat template; start the server with CHAT_TEMPLATE set to a Jinja chat template "
    "(the text itself or a file path), or send a raw prompt to /v1/completions or /generate"
)


class PromptError(ValueError):
    """The messages cannot be rendered with the chat template."""


def render_chat(
    tokenizer: Any, messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]] = None, template: Optional[str] = None
) -> str:
    """Render messages with ``template`` or the tokenizer's own chat template (jinja's sandbox, as transformers runs it).

    Tool definitions go to the template's ``tools`` variable; a template that ignores tools gets them described in
    a system message instead, so the model still knows what it may call.
    """
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise PromptError(NO_TEMPLATE)
    if tools and "tools" not in template:
        messages = with_tools_described(messages, tools)
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools or None, chat_template=template, add_generation_prompt=True, tokenize=False
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
    """Token ids of ``text``; chat prompts already hold their special tokens, raw prompts get BOS if the model uses one."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
