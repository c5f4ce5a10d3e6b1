"""Request bodies checked against pydantic models: clear messages that name each offending field."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from serve.errors import ValidationFailed

M = TypeVar("M", bound=BaseModel)


def check_text(value: Any, path: str = "") -> None:
    """422 naming the field when any string (or key) in ``value`` holds a lone surrogate, which is not text.

    JSON allows ``"\\ud800"`` escapes that decode to unpaired surrogates; no tokenizer, log or UTF-8 writer takes them.
    """
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _has_surrogate(item):
                field = where or "body"
                raise ValidationFailed(
                    f"{field}: the string holds a lone UTF-16 surrogate (invalid Unicode text)", field
                )
        elif isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{where}.{key}" if where else str(key)
                stack.append((key, where))
                stack.append((child, child_path))
        elif isinstance(item, list):
            stack.extend((child, f"{where}.{index}" if where else str(index)) for index, child in enumerate(item))


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def validate(model: type[M], payload: dict[str, Any]) -> M:
    """Parse ``payload`` into ``model``; a 422 (400 on /v1/*) names each offending field, as ``messages[0].content``."""
    check_text(payload)
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        problems = [f"{field_path(error['loc']) or 'body'}: {error['msg']}" for error in exc.errors(include_url=False)]
        first = exc.errors()[0]["loc"] if exc.errors() else ()
        raise ValidationFailed("; ".join(problems), field_path(first) or None) from None


def field_path(loc: tuple) -> str:
    """A pydantic error location as OpenAI names fields: ``messages[0].content``."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path
