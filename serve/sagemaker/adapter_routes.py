"""SageMaker's register / unregister routes for LoRA adapters (which adapter a request asks for: adapter_choice)."""

from __future__ import annotations

import json
from typing import Any, Optional

from flask import Blueprint, Response, request

from serve.errors import BadRequest
from serve.http.routes.adapter_choice import ALIAS_HEADER, registry
from serve.sagemaker.adapters import check_name

blueprint = Blueprint("adapters", __name__)


def _register_fields() -> dict[str, Any]:
    """The JSON body's fields, or the query parameters when there is no JSON body (both forms are accepted)."""
    raw = request.get_data(cache=True)
    if raw.strip():
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            payload = None
        if isinstance(payload, dict):
            return payload
        if request.args.get("name") is None:
            raise BadRequest(
                'the request body must be a JSON object {"name": ..., "src": ...} (or send them as query parameters)'
            )
    return request.args.to_dict()


def _text_field(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if value is None:
        raise BadRequest(
            f'{name}: required; send {{"name": "<adapter name>", "src": "<adapter folder or .tar.gz>"}}', name
        )
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{name}: must be a non-empty string", name)
    return value.strip()


def _flag(fields: dict[str, Any], name: str) -> None:
    """``preload`` and ``pin`` are accepted as the standard has them (every adapter is loaded and stays loaded)."""
    value = fields.get(name)
    if value is not None and not isinstance(value, bool) and str(value).lower() not in ("true", "false", "1", "0"):
        raise BadRequest(f"{name}: must be a boolean", name)


def _alias() -> Optional[str]:
    """The alias header, when sent: a safe name (it is echoed in the answer and shares the names' namespace)."""
    alias = (request.headers.get(ALIAS_HEADER) or "").strip()
    return check_name(alias, ALIAS_HEADER) if alias else None


@blueprint.post("/adapters")
def register_adapter() -> Response:
    """Load a peft LoRA folder (or .tar.gz) as a named adapter; 200 with the standard's message."""
    fields = _register_fields()
    name, src = check_name(_text_field(fields, "name"), "name"), _text_field(fields, "src")
    for flag in ("preload", "pin"):
        _flag(fields, flag)
    alias = _alias()
    registry().register(name, src, alias)
    return Response(f"Adapter {alias or name} registered", 200, mimetype="text/plain")


@blueprint.delete("/adapters/<name>")
def unregister_adapter(name: str) -> Response:
    """Unload an adapter once the requests running on it have finished; 404 when it is not registered."""
    alias = _alias()
    registry().unregister(name)
    return Response(f"Adapter {alias or name} unregistered", 200, mimetype="text/plain")
