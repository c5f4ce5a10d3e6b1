"""Helpers every route uses: the JSON body, pydantic validation with clear messages, the app's services."""

from __future__ import annotations

import json
import sys
from typing import Any, TypeVar

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge
from pydantic import BaseModel, ValidationError

from serve.config import Settings
from serve.http.errors import BadRequest, ValidationFailed
from serve.front.generation import GenerationService

M = TypeVar("M", bound=BaseModel)


def service() -> GenerationService:
    return current_app.extensions["serve.service"]


def settings() -> Settings:
    return current_app.extensions["serve.settings"]


def json_body() -> dict[str, Any]:
    """The request body as a JSON object (any content type is accepted, as SageMaker clients vary)."""
    raw = request_body()
    if not raw.strip():
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        payload = json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest("the request body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    except ValueError:  # Python refuses integers of more than sys.get_int_max_str_digits() digits
        raise BadRequest(
            f"the request body is not valid JSON: a number has more than {sys.get_int_max_str_digits()} digits"
        ) from None
    if not isinstance(payload, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(payload).__name__}")
    return payload


def request_body() -> bytes:
    """The raw body; 413 past MAX_CONTENT_LENGTH, with a ``Content-Length`` or chunked.

    Werkzeug stops a chunked body quietly at the limit; one byte more on the server's own stream tells a body that
    ends there from one that goes on (which is refused, never served cut).
    """
    raw = request.get_data(cache=True)  # raises 413 when Content-Length is past the limit
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit is not None and request.content_length is None and len(raw) >= limit:
        if request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    return raw


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


def token_texts(token_ids: list[int]) -> list[str]:
    """Each token's own text, as clients expect in log-probability listings."""
    if not token_ids:
        return []  # batch_decode([]) answers [""]
    return service().tokenizer.batch_decode([[token_id] for token_id in token_ids])
