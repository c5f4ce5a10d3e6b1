"""Which LoRA adapter a request asks for: the SageMaker header, OpenAI's ``model`` or TGI's ``adapter_id``."""

from __future__ import annotations

from typing import Optional

from flask import request

from serve.errors import NotReady, ValidationFailed
from serve.routes.common import service

HEADER = "X-Amzn-SageMaker-Adapter-Identifier"


def loaded_adapters() -> tuple[str, ...]:
    engine = service().engine
    return tuple(getattr(engine.loaded, "adapters", ())) if engine.ready else ()


def requested_adapter(value: Optional[str], field: str, openai_model: bool = False) -> Optional[str]:
    """The adapter's name, or None for the base model; a 422 naming an adapter that is not loaded.

    The header wins over the body. OpenAI's ``model`` selects an adapter when it names one; any other model name
    means the base model (clients send all sorts of names there).
    """
    header = (request.headers.get(HEADER) or "").strip()
    name, param = (header, HEADER) if header else (value, field)
    if not name:
        return None
    if not service().engine.ready:
        raise NotReady("the model is still loading; retry when /ping answers 200")
    names = loaded_adapters()
    if name in names:
        return name
    if openai_model and not header:
        return None
    loaded = ", ".join(names) if names else "none"
    raise ValidationFailed(f"{param}: adapter {name!r} is not loaded (loaded adapters: {loaded})", param)
