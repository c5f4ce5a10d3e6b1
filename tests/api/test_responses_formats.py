"""The Responses API on a tiny model scripted to think and call tools in its family's format
(tests/e2e/scripted_model.py): reasoning items, function calls found in free text, effort reaching the template."""

from __future__ import annotations

import json

import pytest

from serve.app import create_app
from serve.config import Settings
from serve.wiring import single_engine
from tests.e2e.scripted_model import build_scripted_model
from tests.helpers import TINY_KV_TOKENS, sse_data

TOOLS = [
    {"type": "function", "name": name, "parameters": {"type": "object", "properties": {}}}
    for name in ("get_weather", "get_time")
]
THOUGHTS = "\nThe user wants the weather and the time in Paris.\n"
LONG_THOUGHTS = "\nFirst I weigh every option one by one, slowly, and then once more from the start"
CALLS = [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})]


@pytest.fixture(scope="module")
def scripted_client(tmp_path_factory, embedded_folder):
    folder = build_scripted_model(tmp_path_factory.mktemp("scripted"), embedded_folder)
    settings = Settings(
        model_id=str(folder),
        model_dir="/nonexistent",
        max_concurrent_requests=8,
        max_batch_total_tokens=TINY_KV_TOKENS,
        dtype="float32",
    )
    engine = single_engine(settings)
    engine.start()
    assert engine.wait_ready(120), f"scripted engine failed to load: {engine.load_error}"
    yield create_app(settings, engine).test_client()
    engine.stop()


def respond(client, trigger: str, **body) -> dict:
    """The response to the trigger (the final one, when streamed), its events checked for order."""
    response = client.post("/v1/responses", json={"model": "m", "input": f"Hi {trigger}", **body})
    assert response.status_code == 200, response.get_data(as_text=True)
    if not body.get("stream"):
        return response.get_json()
    events = [json.loads(data) for data in sse_data(response.get_data(as_text=True))]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    final = events[-1]["response"]
    thoughts = "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta")
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    arguments = [e["arguments"] for e in events if e["type"] == "response.function_call_arguments.done"]
    assert thoughts == "".join(item["content"][0]["text"] for item in final["output"] if item["type"] == "reasoning")
    assert text == "".join(item["content"][0]["text"] for item in final["output"] if item["type"] == "message")
    assert arguments == [item["arguments"] for item in final["output"] if item["type"] == "function_call"]
    return final


@pytest.mark.parametrize("stream", [False, True])
def test_thoughts_text_and_calls_become_items_in_order(scripted_client, stream):
    final = respond(scripted_client, "⟦think-call⟧", tools=TOOLS, max_output_tokens=200, stream=stream)
    reasoning, message, *calls = final["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"] == [{"type": "reasoning_text", "text": THOUGHTS}]
    assert message["type"] == "message" and message["content"][0]["text"] == "Let me check both.\n"
    assert [(call["name"], json.loads(call["arguments"])) for call in calls] == CALLS
    assert len({call["call_id"] for call in calls}) == 2 and final["status"] == "completed"
    thought_tokens = final["usage"]["output_tokens_details"]["reasoning_tokens"]
    assert 0 < thought_tokens < final["usage"]["output_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_budget_ending_in_the_thoughts_leaves_only_an_incomplete_reasoning_item(scripted_client, stream):
    final = respond(scripted_client, "⟦think-long⟧", max_output_tokens=10, stream=stream)
    (reasoning,) = final["output"]
    assert reasoning["type"] == "reasoning" and reasoning["status"] == "incomplete"
    thoughts = reasoning["content"][0]["text"]
    assert thoughts and LONG_THOUGHTS.startswith(thoughts) and "<think>" not in json.dumps(final)
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}


def test_a_json_format_applies_after_the_thoughts(scripted_client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    text = {"format": {"type": "json_schema", "name": "city", "schema": schema}}
    reasoning, message = respond(scripted_client, "⟦think-json⟧", text=text, max_output_tokens=60)["output"]
    assert reasoning["content"][0]["text"] == "\nA JSON object with the city.\n"
    assert json.loads(message["content"][0]["text"]) == {"city": "Paris"}


def test_reasoning_effort_reaches_the_template(scripted_client):
    (message,) = respond(scripted_client, "", reasoning={"effort": "low"}, max_output_tokens=30)["output"]
    assert message["content"][0]["text"] == "Quick answer: Paris."
