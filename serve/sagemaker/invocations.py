"""SageMaker's routes: /ping and /invocations (Messages API switch, else dispatch by payload shape)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from serve.front.context import RequestContext
from serve.errors import ValidationFailed
from serve.http.routes import openai, responses, tgi
from serve.http.routes.common import admitted, json_body, service, settings
from serve.sagemaker import native

blueprint = Blueprint("sagemaker", __name__)

CHAT, COMPLETION, GENERATE, RESPONSES = "chat", "completion", "generate", "responses"


@blueprint.get("/ping")
def ping() -> Response:
    """200 while a copy of the model is ready, 503 before, while shutting down, while a dead engine process reloads
    (``restarting``) or while one makes no progress (``stalled``); never waits on generation."""
    engine = service().engine
    if engine.ready:
        return jsonify({"status": "healthy"})
    recovering = getattr(engine, "recovery_state", None)  # a pool's; an in-process engine neither restarts nor stalls
    status = "failed" if engine.load_error is not None else recovering or "loading"
    return jsonify({"status": status}), 503


@blueprint.post("/invocations")
def invocations() -> Response:
    answer = native.session_response()  # {"requestType": "NEW_SESSION" | "CLOSE"}
    if answer is not None:
        return answer
    context = native.invocation_context()  # live session id, deadline
    handler = current_app.extensions.get("serve.sagemaker.custom_handler")  # code/inference.py: input_fn / output_fn
    if handler is None:
        response = dispatch(json_body(), context)
    else:
        rendered = dispatch(handler.payload(request, json_body), context)
        response = handler.render(rendered, request.headers.get("Accept", "application/json"))
    return native.mark_deadline(response, admitted())


def dispatch(payload: dict[str, Any], context: RequestContext) -> Response:
    """Route an /invocations payload by its shape (or the MESSAGES_API_ENABLED switch)."""
    kind = payload_kind(payload, settings().messages_api_enabled)
    if kind == CHAT:
        return openai.chat_completions(payload, context)
    if kind == COMPLETION:
        return openai.completions(payload, context)
    if kind == RESPONSES:
        return responses.responses(payload, context)
    return tgi.generate(payload, context, as_list=True)


def payload_kind(payload: dict[str, Any], messages_api_enabled: bool) -> str:
    """Which API an /invocations body speaks: chat (``messages``), completion (``prompt``) or TGI (``inputs``); with
    MESSAGES_API_ENABLED, chat or the Responses API (``input`` instead of ``messages``)."""
    if messages_api_enabled:
        if "messages" in payload:
            return CHAT
        if "input" in payload:
            return RESPONSES
        hint = ' (TGI-style "inputs" is not accepted while MESSAGES_API_ENABLED is true)' if "inputs" in payload else ""
        raise ValidationFailed(
            'messages: MESSAGES_API_ENABLED is true, so /invocations expects {"messages": [{"role": "user", '
            f'"content": "..."}}]}} (chat) or {{"input": "..."}} (Responses API){hint}',
            "messages",
        )
    if "inputs" in payload:
        return GENERATE
    if "messages" in payload:
        return CHAT
    if "prompt" in payload:
        return COMPLETION
    raise ValidationFailed(
        'inputs: send {"inputs": "..."} (TGI), {"messages": [...]} (chat) or {"prompt": "..."} (completion)', "inputs"
    )
