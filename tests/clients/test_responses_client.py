"""The real ``openai`` client's Responses API (``client.responses.create`` and ``client.responses.stream``) against
real gunicorn serving a tiny random Llama."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


class Verdict(BaseModel):
    answer: Literal["yes", "no", "maybe"]
    confident: bool


def test_create_whole_and_streamed_agree(openai_client):
    request = {"model": "tgi", "instructions": "Be brief.", "input": "What is deep learning?", "temperature": 0}
    whole = openai_client.responses.create(**request, max_output_tokens=10)
    assert whole.id.startswith("resp_") and whole.status == "incomplete"
    assert whole.incomplete_details.reason == "max_output_tokens"
    assert whole.usage.output_tokens == 10 and whole.usage.total_tokens == whole.usage.input_tokens + 10
    events = list(openai_client.responses.create(**request, max_output_tokens=10, stream=True))
    assert [event.type for event in events[:4]] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == whole.output_text and events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == whole.output_text


def test_stream_helper_parses_structured_output(openai_client):
    with openai_client.responses.stream(
        model="tgi", input="Is the sky blue?", text_format=Verdict, temperature=0
    ) as stream:
        snapshots = [event.snapshot for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and snapshots and snapshots[-1] == final.output_text
    assert isinstance(final.output_parsed, Verdict)
    assert Verdict.model_validate_json(final.output_text) == final.output_parsed


def test_parse_returns_the_structured_output(openai_client):
    parsed = openai_client.responses.parse(model="tgi", input="Is it raining?", text_format=Verdict, temperature=0)
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Verdict)


def test_function_call_round_trip(openai_client):
    first = openai_client.responses.create(
        model="tgi", input="Weather in Paris?", tools=[WEATHER], tool_choice="required", temperature=0
    )
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Tokyo")
    # the next turn: the earlier output (as the SDK returned it) and the call's result, as agent loops send them
    history = [{"role": "user", "content": "Weather in Paris?"}, *first.output]
    history.append({"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"})
    second = openai_client.responses.create(
        model="tgi", input=history, tools=[WEATHER], max_output_tokens=6, temperature=0
    )
    assert second.usage.input_tokens > first.usage.input_tokens and second.output[0].type == "message"


def test_stream_helper_reassembles_a_function_call(openai_client):
    with openai_client.responses.stream(
        model="tgi", input="Weather?", tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}
    ) as stream:
        argument_deltas = [event for event in stream if event.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    (call,) = final.output
    assert call.type == "function_call" and argument_deltas[-1].snapshot == call.arguments
    assert call.parsed_arguments["city"] in ("Paris", "Tokyo")  # strict tools are parsed by the SDK


@pytest.mark.parametrize(
    "extra, param",
    [({"store": True}, "store"), ({"previous_response_id": "resp_123"}, "previous_response_id")],
)
def test_stateful_fields_are_refused(openai_client, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        openai_client.responses.create(model="tgi", input="Hi", **extra)
    assert caught.value.param == param and "stateless" in caught.value.message
