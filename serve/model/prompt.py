"""Turn chat messages and raw prompts into token ids with the model's own chat template."""

from __future__ import annotations

from typing import Any, Iterable

FALLBACK_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


class PromptError(ValueError):
    """The messages cannot be rendered with the model's chat template."""


def render_chat(tokenizer: Any, messages: Iterable[dict[str, Any]]) -> str:
    """Render messages with the tokenizer's chat template (a plain role-prefixed fallback when it has none)."""
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            list(messages), chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # jinja raises TemplateError and friends for conversations the template rejects
        raise PromptError(f"the model's chat template rejected these messages: {exc}") from exc


def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of ``text``; chat prompts already hold their special tokens, raw prompts get BOS if the model uses one."""
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
