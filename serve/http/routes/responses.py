"""OpenAI's Responses API (``POST /v1/responses``, and ``{"input": ...}`` on /invocations with MESSAGES_API_ENABLED):
a stateless response generated over the chat completion path.

The body is validated as a Responses request (a 400 naming its fields), turned into a chat completion body and
validated by the chat validation step (its errors renamed to the Responses fields), admitted, and its answer written
as output items: the message, or the function calls the tool parsing finds.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from flask import Blueprint, Response, jsonify
from pydantic import ValidationError

from serve.engine import TokenEvent
from serve.engine.types import FinishReason
from serve.errors import GenerationFailed, ValidationFailed
from serve.front.context import Api, RequestContext
from serve.front.generation import ValidRequest, timing_headers
from serve.http.routes import sse
from serve.http.routes.common import admit, api_json_body, request_context, service, stream_events, validator
from serve.http.routes.parsing import check_text, field_path
from serve.http.routes.responses_stream import ResponseEvents
from serve.http.schemas import openai as oa
from serve.http.schemas import responses_api_output as out
from serve.http.schemas.responses_api import ResponsesRequest, chat_body, error_location
from serve.http.schemas.tools import ToolCallBuffer, parse_tool_calls, truncated_tool_call

blueprint = Blueprint("responses", __name__)

# chat body fields -> the Responses fields they come from, for the chat validation step's errors
CHAT_FIELDS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


@blueprint.post("/v1/responses")
def responses_route() -> Response:
    """OpenAI Responses API (stateless)."""
    return responses(api_json_body(), request_context())


def responses(payload: dict[str, Any], context: RequestContext) -> Response:
    """Serve one Responses API request (also reached from /invocations)."""
    req = parse_request(payload)
    valid = chat_request(req)
    generation = admit(valid, context.speaking(Api.CHAT, req.stream))
    skeleton = out.response_skeleton(req, out.new_item_id("resp"))
    if req.stream:
        events = _stream(generation, valid.body, ResponseEvents(skeleton))
        return sse.response(events, generation.pending)
    choice = service().collect(generation)[0]
    text, calls = _answer(choice.text, choice.final, valid.body)
    output = [out.function_call_item(out.new_item_id("fc"), call, _status(choice.final)) for call in calls]
    if not calls:
        output = [out.message_item(out.new_item_id("msg"), text, _status(choice.final))]
    body = out.finished(skeleton, output, _usage(choice.final), _cut(choice.final))
    response = jsonify(body)
    response.headers.update(timing_headers(choice.final))
    return response


def parse_request(payload: dict[str, Any]) -> ResponsesRequest:
    """The body as a Responses request; a 400 names each offending field, as ``input[0].content[1]``."""
    check_text(payload)
    try:
        return ResponsesRequest.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        paths = [field_path(error_location(error["loc"])) or "body" for error in errors]
        problems = [f"{path}: {error['msg']}" for path, error in zip(paths, errors)]
        raise ValidationFailed("; ".join(problems), paths[0] if paths else None) from None


def chat_request(req: ResponsesRequest) -> ValidRequest[oa.ChatCompletionRequest]:
    """The request through the chat validation step (prompt, budget, grammar, adapter), its errors named by the
    Responses fields."""
    try:
        return validator().chat(chat_body(req))
    except ValidationFailed as exc:
        renamed = CHAT_FIELDS.get(exc.param or "")
        if renamed is not None:
            if exc.message.startswith(exc.param):
                exc.message = renamed + exc.message[len(exc.param) :]
            exc.param = renamed
        raise


def _answer(text: str, final: TokenEvent, req: oa.ChatCompletionRequest) -> tuple[str, list[dict[str, Any]]]:
    """(the answer's text, its function calls): calls when the text is one (or a forced call cut by the budget)."""
    calls = parse_tool_calls(text, req.active_tools) if req.active_tools else None
    if calls is None and req.forced_tools and _cut(final):
        calls = truncated_tool_call(text, req.forced_tools)
    return ("" if calls else text), calls or []


def _stream(generation: Any, req: oa.ChatCompletionRequest, writer: ResponseEvents) -> Iterator[str]:
    """The events of a streamed response: text deltas as they come (text that may be a call is held back until
    the end tells), then the calls and the final response; a failure ends it with response.failed."""
    yield from writer.begin()
    tools = req.forced_tools or req.active_tools
    buffer = ToolCallBuffer(tools, bool(req.forced_tools)) if req.active_tools else None
    try:
        for item in stream_events(generation):
            if item is None:
                yield sse.KEEPALIVE
                continue
            event = item[1]
            yield from writer.text(buffer.feed(event.text) if buffer else event.text)
            if event.finish_reason is not None:
                yield from _stream_end(writer, buffer, event)
    except GenerationFailed as exc:
        yield from writer.fail(exc.error_type, exc.message)


def _stream_end(writer: ResponseEvents, buffer: Optional[ToolCallBuffer], final: TokenEvent) -> Iterator[str]:
    rest, calls = buffer.finish(truncated=_cut(final)) if buffer else ("", None)
    yield from writer.text(rest)
    yield from writer.finish(calls or [], _usage(final), _cut(final))


def _cut(final: TokenEvent) -> bool:
    return final.finish_reason is FinishReason.LENGTH


def _status(final: TokenEvent) -> str:
    return "incomplete" if _cut(final) else "completed"


def _usage(final: TokenEvent) -> dict[str, Any]:
    return out.usage(final.prompt_tokens, final.generated_tokens, final.cached_tokens)
