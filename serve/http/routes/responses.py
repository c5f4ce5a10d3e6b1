"""OpenAI's Responses API (``POST /v1/responses``, and ``{"input": ...}`` on /invocations with MESSAGES_API_ENABLED):
a stateless response generated over the chat completion path.

The body is validated as a Responses request (a 400 naming its fields), turned into a chat completion body and
validated by the chat validation step (its errors renamed to the Responses fields), admitted, and its answer read by
the chat route's reading of the model's output (its thoughts, and its family's tool-call format) into output items:
a reasoning item, the message, the function calls.
"""

from __future__ import annotations

from typing import Any, Iterator

from flask import Blueprint, Response, jsonify
from pydantic import ValidationError

from serve.engine import TokenEvent
from serve.engine.types import FinishReason
from serve.errors import BadRequest, GenerationFailed, ValidationFailed
from serve.front.context import Api, RequestContext
from serve.front.chat_output import OutputDelta, event_text, parse_text
from serve.front.generation import Generation, ValidRequest, timing_headers
from serve.front.prompt import encode
from serve.http.routes import sse
from serve.http.routes.common import admit, api_json_body, request_context, service, stream_events, validator
from serve.http.routes.openai import ChatReading
from serve.http.routes.parsing import check_text, field_path
from serve.http.routes.responses_stream import ResponseEvents
from serve.http.schemas import openai as oa
from serve.http.schemas import responses_api_output as out
from serve.http.schemas.responses_api import ResponsesRequest, error_location
from serve.http.schemas.responses_api_chat import chat_body

blueprint = Blueprint("responses", __name__)

# chat body fields -> the Responses fields they come from, for the chat validation step's errors
CHAT_FIELDS = {
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "reasoning_effort": "reasoning.effort",
}


@blueprint.post("/v1/responses")
def responses_route() -> Response:
    """OpenAI Responses API (stateless)."""
    return responses(api_json_body(), request_context())


def responses(payload: dict[str, Any], context: RequestContext) -> Response:
    """Serve one Responses API request (also reached from /invocations)."""
    req = parse_request(payload)
    valid = chat_request(req)
    reading = ChatReading.of(valid)
    generation = admit(reading.constrained(valid), context.speaking(Api.CHAT, req.stream))
    skeleton = out.response_skeleton(req, out.new_item_id("resp"))
    if req.stream:
        return sse.response(_stream(generation, reading, ResponseEvents(skeleton)), generation.pending)
    choice = service().collect(generation)[0]
    cut = _cut(choice.final)
    answer = parse_text(reading.parser(), reading.text(choice), cut)
    usage = _usage(choice.final, answer.reasoning)
    response = jsonify(out.finished(skeleton, _output(answer, _status(choice.final)), usage, cut))
    response.headers.update(timing_headers(choice.final))
    return response


def _output(answer: OutputDelta, status: str) -> list[dict[str, Any]]:
    """The output items of a whole answer: its thoughts, its text (even empty, unless there is something else),
    its function calls."""
    thought_status = status if not (answer.content or answer.tool_calls) else "completed"
    items = [out.reasoning_item(out.new_item_id("rs"), answer.reasoning, thought_status)] if answer.reasoning else []
    if answer.content or not (answer.tool_calls or answer.reasoning):
        items.append(out.message_item(out.new_item_id("msg"), answer.content, status))
    items += [out.function_call_item(out.new_item_id("fc"), call.openai(), "completed") for call in answer.tool_calls]
    return items


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
    except (ValidationFailed, BadRequest) as exc:
        renamed = CHAT_FIELDS.get(exc.param or "")
        if renamed is not None:
            if exc.message.startswith(exc.param):
                exc.message = renamed + exc.message[len(exc.param) :]
            exc.param = renamed
        raise


def _stream(generation: Generation, reading: ChatReading, writer: ResponseEvents) -> Iterator[str]:
    """The events of a streamed response: thoughts, text and calls as the model's output is read, then the final
    response; a failure after the start ends it with ``error`` and response.failed."""
    yield from writer.begin()
    parser, reasoning = reading.parser(), []
    try:
        for item in stream_events(generation):
            if item is None:
                yield sse.KEEPALIVE
                continue
            event = item[1]
            delta = parser.feed(event_text(event, reading.markers))
            if event.finish_reason is not None:
                delta += parser.finish(_cut(event))
            reasoning.append(delta.reasoning)
            yield from writer.reasoning(delta.reasoning)
            yield from writer.text(delta.content)
            yield from writer.calls([call.openai() for call in delta.tool_calls])
            if event.finish_reason is not None:
                yield from writer.finish(_usage(event, "".join(reasoning)), _cut(event))
    except GenerationFailed as exc:
        yield from writer.fail(exc.error_type, exc.message)


def _cut(final: TokenEvent) -> bool:
    return final.finish_reason is FinishReason.LENGTH


def _status(final: TokenEvent) -> str:
    return "incomplete" if _cut(final) else "completed"


def _usage(final: TokenEvent, reasoning: str) -> dict[str, Any]:
    """Usage; the reasoning tokens are the thoughts' text tokenized again (the engine does not tell them apart)."""
    thought_tokens = len(encode(service().tokenizer, reasoning, add_special_tokens=False)) if reasoning else 0
    return out.usage(
        final.prompt_tokens, final.generated_tokens, final.cached_tokens, min(thought_tokens, final.generated_tokens)
    )
