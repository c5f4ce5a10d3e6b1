"""The streamed event sequence of a response: order, numbering, and what each terminal event carries."""

import json

from serve.http.routes.responses_stream import ResponseEvents
from serve.http.schemas import responses_api_output as out
from serve.http.schemas.responses_api import ResponsesRequest

USAGE = out.usage(10, 3, 4)
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def writer() -> ResponseEvents:
    return ResponseEvents(out.response_skeleton(ResponsesRequest(input="Hi"), "resp_1"))


def parse(chunks) -> list[dict]:
    """Each SSE event's data, checked against its ``event:`` line."""
    events = []
    for chunk in chunks:
        name, data = chunk.strip().split("\n")
        body = json.loads(data.removeprefix("data: "))
        assert name == f"event: {body['type']}"
        events.append(body)
    return events


def types(events) -> list[str]:
    return [event["type"] for event in events]


def stream(w: ResponseEvents, *steps) -> list[dict]:
    chunks = list(w.begin())
    for step in steps:
        chunks += list(step(w))
    events = parse(chunks)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    return events


def test_text_answer_follows_the_documented_sequence():
    events = stream(writer(), lambda w: w.text("Hel"), lambda w: w.text("lo"), lambda w: w.finish(USAGE, False))
    assert types(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    item_id = events[2]["item"]["id"]
    assert item_id.startswith("msg_") and {e["item_id"] for e in events[3:8]} == {item_id}
    assert events[6]["text"] == "Hello" and events[7]["part"]["text"] == "Hello"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["incomplete_details"] is None and final["usage"] == USAGE
    assert final["output"] == [out.message_item(item_id, "Hello", "completed")] == [events[8]["item"]]
    assert final["id"] == events[0]["response"]["id"] == "resp_1"


def test_text_stays_one_message_until_a_call_follows_it():
    steps = [lambda w: w.text("A"), lambda w: w.calls([]), lambda w: w.text("B"), lambda w: w.calls([CALL])]
    events = stream(writer(), *steps, lambda w: w.text("C"), lambda w: w.finish(USAGE, False))
    output = events[-1]["response"]["output"]
    assert [item["type"] for item in output] == ["message", "function_call", "message"]
    assert [item["content"][0]["text"] for item in output if item["type"] == "message"] == ["AB", "C"]
    assert [item["status"] for item in output] == ["completed"] * 3


def test_cut_by_the_budget_ends_incomplete():
    events = stream(writer(), lambda w: w.text("Hi"), lambda w: w.finish(USAGE, True))
    assert types(events)[-1] == "response.incomplete"
    final = events[-1]["response"]
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"


def test_function_calls_are_items_with_their_arguments():
    events = stream(writer(), lambda w: w.calls([CALL, {**CALL, "id": "call_2"}]), lambda w: w.finish(USAGE, False))
    assert types(events)[2:] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ] * 2 + ["response.completed"]
    added, delta, done, item_done = events[2:6]
    assert added["item"]["arguments"] == "" and added["item"]["status"] == "in_progress"
    assert delta["delta"] == done["arguments"] == '{"city": "Paris"}'
    assert item_done["item"]["call_id"] == "call_1" and item_done["item"]["name"] == "get_weather"
    output = events[-1]["response"]["output"]
    assert [item["call_id"] for item in output] == ["call_1", "call_2"]
    assert [item["type"] for item in output] == ["function_call"] * 2 and events[6]["output_index"] == 1


def test_an_empty_answer_is_still_a_message():
    events = stream(writer(), lambda w: w.text(""), lambda w: w.finish(USAGE, False))
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == ""
    assert "response.output_text.delta" not in types(events)


def test_reasoning_comes_as_its_own_item_before_the_answer():
    events = stream(
        writer(), lambda w: w.reasoning("Think"), lambda w: w.text("Answer"), lambda w: w.finish(USAGE, False)
    )
    assert types(events)[2:9] == [
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
    ]
    reasoning, message = events[-1]["response"]["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"] == [{"type": "reasoning_text", "text": "Think"}]
    assert message["content"][0]["text"] == "Answer" and events[8]["output_index"] == 1


def test_a_failure_after_the_start_sends_error_then_response_failed():
    events = stream(writer(), lambda w: w.text("Hi"), lambda w: w.fail("generation", "the model failed"))
    assert types(events)[-5:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "error",
        "response.failed",
    ]
    assert events[-2]["message"] == "the model failed" and events[-2]["code"] == "generation"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["message"] == "the model failed"
    assert failed["output"][0]["status"] == "incomplete"
