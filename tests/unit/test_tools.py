"""Tool definitions and the forcing schema; the generic JSON call read back from model text, and streamed text
held while it may be a call."""

from serve.front.tool_calls import parse_json_calls, truncated_call
from serve.front.tool_formats import JSON
from serve.front.tool_parsers import ForcedCallParser, ToolCallParser
from serve.http.schemas.tools import Tool, call_schema

NAMES = frozenset({"get_weather"})

WEATHER = Tool.model_validate(
    {"function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
)


def test_plain_json_and_tagged_calls_are_read():
    for text in (
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        '```json\n[{"name": "get_weather", "parameters": {"city": "Paris"}}]\n```',
    ):
        (call,) = parse_json_calls(text, NAMES)
        assert call.openai()["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        assert call.id.startswith("call_")


def test_prose_and_unknown_functions_are_not_calls():
    assert parse_json_calls("It is sunny in Paris.", NAMES) is None
    assert parse_json_calls('{"name": "launch_rocket", "arguments": {}}', NAMES) is None
    assert parse_json_calls('{"city": "Paris"}', NAMES) is None


def test_buffer_streams_prose_at_once_and_holds_a_call():
    prose = ToolCallParser(JSON, NAMES)
    assert (
        prose.feed("  ") == ("", []) and prose.feed("Hello") == ("  Hello", []) and prose.feed(" there")[0] == " there"
    )
    assert prose.finish() == ("", [])
    call = ToolCallParser(JSON, NAMES)
    assert call.feed('{"name": "get_weather", ') == ("", []) and call.feed('"arguments": {"city": "Oslo"}}') == ("", [])
    rest, calls = call.finish()
    assert rest == "" and calls[0].name == "get_weather"


def test_call_schema_pins_the_name_of_each_tool():
    other = Tool.model_validate({"function": {"name": "get_time"}})
    schema = call_schema([WEATHER, other])
    assert [variant["properties"]["name"] for variant in schema["anyOf"]] == [
        {"const": "get_weather"},
        {"const": "get_time"},
    ]
    assert call_schema([WEATHER])["properties"]["arguments"] == WEATHER.function.parameters


def test_a_forced_call_cut_by_max_tokens_keeps_name_and_partial_arguments():
    tools = ["calc", "clock"]
    call = truncated_call('{"name": "calc", "arguments": {"a": 1, "b', tools)
    assert (call.name, call.arguments) == ("calc", '{"a": 1, "b')
    assert (truncated_call('{"name": "clo', tools).name, truncated_call('{"name": "clo', tools).arguments) == (
        "clock",
        "",
    )
    assert truncated_call("", tools[1:]).name == "clock"
    forced = ForcedCallParser(tools[:1])
    forced.feed('{"name": "calc", "arguments": {"a"')
    rest, calls = forced.finish(truncated=True)
    assert rest == "" and (calls[0].name, calls[0].arguments) == ("calc", '{"a"')
    assert forced.finish(truncated=False) == ('{"name": "calc", "arguments": {"a"', [])  # not cut: not a call
