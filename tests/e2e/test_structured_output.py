"""Structured output and tool calls on the embedded SmolLM2, through the real openai client (slow: a real model)."""

import json

import jsonschema
import pytest
from openai import OpenAI

from tests.helpers import start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    server = start_server({"DEFAULT_MAX_NEW_TOKENS": "96"}, tmp_path_factory.mktemp("logs"))
    yield OpenAI(base_url=f"{server.url}/v1", api_key="-", timeout=300)
    server.stop()


def test_json_schema_answer_from_a_real_model(client):
    response = client.chat.completions.create(
        model="tgi",
        messages=[{"role": "user", "content": "Invent a person. Give their name and age."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        max_tokens=60,
        temperature=0,
    )
    person = json.loads(response.choices[0].message.content)
    jsonschema.validate(person, PERSON)
    assert person["name"].strip()


def test_tool_call_from_a_real_model(client):
    response = client.chat.completions.create(
        model="tgi",
        messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    call = response.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    assert "paris" in arguments["city"].lower()
