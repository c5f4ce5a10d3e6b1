"""POST /v1/responses through the Flask app on the tiny random Llama: output items, usage, the streamed event
sequence, structured output, forced function calls, earlier turns' calls, refusals, and /invocations."""

import json

import jsonschema
import pytest

from tests.helpers import sse_data

GREEDY = {"temperature": 0, "max_output_tokens": 8}
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "enum": ["yes", "no"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["answer", "score"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def events_of(response) -> list[dict]:
    """The streamed events, each checked against its ``event:`` line and numbered in order from 0."""
    text = response.get_data(as_text=True)
    names = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    events = [json.loads(data) for data in sse_data(text)]
    assert names == [event["type"] for event in events]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    return events


def output_text(body: dict) -> str:
    return "".join(part["text"] for item in body["output"] if item["type"] == "message" for part in item["content"])


def test_a_response_holds_the_chat_answer_and_usage(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is deep learning?"}]
    chat = client.post("/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 8}).json
    response = client.post(
        "/v1/responses", json={"instructions": "Be brief.", "input": "What is deep learning?", **GREEDY}
    )
    assert response.status_code == 200, response.json
    body = response.json
    assert body["id"].startswith("resp_") and body["object"] == "response" and body["created_at"] > 0
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    (message,) = body["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["id"].startswith("msg_")
    assert output_text(body) == chat["choices"][0]["message"]["content"]  # the same prompt, the same greedy answer
    usage = body["usage"]
    assert usage["input_tokens"] == chat["usage"]["prompt_tokens"] and usage["output_tokens"] == 8
    assert (
        usage["total_tokens"] == usage["input_tokens"] + 8 and usage["output_tokens_details"]["reasoning_tokens"] == 0
    )
    assert int(response.headers["x-generated-tokens"]) == 8
    assert body["instructions"] == "Be brief." and body["max_output_tokens"] == 8 and body["store"] is False


def test_the_stream_follows_the_documented_sequence_and_equals_the_whole_answer(client):
    whole = client.post("/v1/responses", json={"input": "Hello there", **GREEDY}).json
    response = client.post("/v1/responses", json={"input": "Hello there", "stream": True, **GREEDY})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = events_of(response)
    kinds = [event["type"] for event in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # cut by max_output_tokens
    ]
    text = "".join(event["delta"] for event in events if event["type"] == "response.output_text.delta")
    assert text == output_text(whole) == events[-4]["text"]
    final = events[-1]["response"]
    assert final["id"] == events[0]["response"]["id"] and final["status"] == "incomplete"
    assert output_text(final) == text and final["usage"]["output_tokens"] == 8


def test_json_schema_format_completes_with_json_that_follows_it(client):
    text = {"format": {"type": "json_schema", "name": "verdict", "schema": SCHEMA, "strict": True}}
    for stream in (False, True):
        response = client.post(
            "/v1/responses", json={"input": "Is it?", "text": text, "stream": stream, "temperature": 0}
        )
        assert response.status_code == 200, response.get_data(as_text=True)
        body = events_of(response)[-1]["response"] if stream else response.json
        assert body["status"] == "completed" and body["incomplete_details"] is None
        jsonschema.validate(json.loads(output_text(body)), SCHEMA)
        assert body["text"]["format"]["name"] == "verdict"


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_function_call_is_a_function_call_item(client, stream):
    body = {"input": "Weather?", "tools": [WEATHER], "tool_choice": "required", "temperature": 0, "stream": stream}
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.get_data(as_text=True)
    final = events_of(response)[-1]["response"] if stream else response.json
    (call,) = final["output"]
    assert call["type"] == "function_call" and call["name"] == "get_weather" and call["id"].startswith("fc_")
    assert call["call_id"].startswith("call_") and json.loads(call["arguments"])["city"] in ("Paris", "Tokyo")
    assert final["status"] == "completed" and final["tool_choice"] == "required"


def test_earlier_calls_and_their_outputs_reach_the_prompt(client):
    first = [{"role": "user", "content": "Weather in Paris?"}]
    turn = first + [
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 24 C"},
    ]
    sizes = []
    for items in (first, turn):
        response = client.post("/v1/responses", json={"input": items, "tools": [WEATHER], **GREEDY})
        assert response.status_code == 200, response.json
        sizes.append(response.json["usage"]["input_tokens"])
    assert sizes[1] > sizes[0] + 5  # the call and its output are in the prompt


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": "Hi", "store": True}, "store"),
        ({"input": "Hi", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "Hi", "background": True}, "background"),
        ({"input": "Hi", "tools": [{"type": "web_search_preview"}]}, "tools[0]"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
            "input",  # a text-only model: "input: this model takes no images ..."
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
            "input[0].content[0]",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]},
            "input[0].content[0]",
        ),
        ({"input": "Hi", "max_output_tokens": 100000}, "max_output_tokens"),
        ({"input": "word " * 5000}, "input"),
        ({"input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        (
            {"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
            "text.format",
        ),
    ],
)
def test_invalid_requests_get_openai_400s_naming_the_field(client, body, param):
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"].startswith(param)
    assert client.post("/v1/responses", json={"input": "Hi", **GREEDY}).status_code == 200  # and the server serves on


def test_invocations_routes_input_to_the_responses_api_with_the_messages_api(messages_client, client):
    response = messages_client.post("/invocations", json={"input": "Hi", **GREEDY})
    assert response.status_code == 200, response.json
    assert response.json["object"] == "response" and response.json["usage"]["output_tokens"] == 8
    streamed = messages_client.post("/invocations", json={"input": "Hi", "stream": True, **GREEDY})
    assert events_of(streamed)[-1]["type"] == "response.incomplete"
    refused = messages_client.post("/invocations", json={"input": "Hi", "store": True})
    assert refused.status_code == 422 and "store" in refused.json["error"]  # TGI's error style on /invocations
    tgi_mode = client.post("/invocations", json={"input": "Hi"})  # MESSAGES_API_ENABLED off: TGI's shapes only
    assert tgi_mode.status_code == 422 and "inputs" in tgi_mode.json["error"]
