"""Which LoRA adapter a request asks for: the SageMaker adapter headers, else the body's field (or OpenAI's model)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from flask import current_app, request

from serve.errors import NotReady, ValidationFailed
from serve.http.routes.common import service

if TYPE_CHECKING:
    from serve.sagemaker.adapters import AdapterRegistry

HEADER = "X-Amzn-SageMaker-Adapter-Identifier"
ALIAS_HEADER = "X-Amzn-SageMaker-Adapter-Alias"


def registry() -> AdapterRegistry:
    return current_app.extensions["serve.adapters"]


def loaded_adapters() -> tuple[str, ...]:
    return registry().names() if service().engine.ready else ()


def requested_adapter(value: Optional[str], field: str, openai_model: bool = False) -> Optional[str]:
    """The adapter's name, or None for the base model; a 422 naming an adapter that is not loaded.

    The SageMaker headers win over the body (the identifier, else the alias an adapter was registered under).
    OpenAI's ``model`` selects an adapter when it names one; any other model name means the base model (clients
    send all sorts of names there).
    """
    header, param = "", field
    for name in (HEADER, ALIAS_HEADER):
        header = (request.headers.get(name) or "").strip()
        if header:
            param = name
            break
    name = header or value
    if not name:
        return None
    if not service().engine.ready:
        raise NotReady("the model is still loading; retry when /ping answers 200")
    found = registry().resolve(name)
    if found is not None:
        return found
    if openai_model and not header:
        return None
    names = loaded_adapters()
    loaded = ", ".join(names) if names else "none"
    raise ValidationFailed(f"{param}: adapter {name!r} is not loaded (loaded adapters: {loaded})", param)
