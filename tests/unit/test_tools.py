"""Reading tool calls back from model text, and holding streamed text that may be a call."""

from serve.http.schemas.tools import Tool, ToolCallBuffer, call_schema, parse_tool_calls

WEATHER = Tool.model_validate(
    {"function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
)


def test_plain_json_and_tagged_calls_are_read():
    for text in (
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        '```json\n[{"name": "get_weather", "parameters": {"city": "Paris"}}]\n```',
    ):
        (call,) = parse_tool_calls(text, [WEATHER])
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'} and call["id"].startswith(
            "call_"
        )


def test_prose_and_unknown_functions_are_not_calls():
    assert parse_tool_calls("It is sunny in Paris.", [WEATHER]) is None
    assert parse_tool_calls('{"name": "launch_rocket", "arguments": {}}', [WEATHER]) is None
    assert parse_tool_calls('{"city": "Paris"}', [WEATHER]) is None


def test_buffer_streams_prose_at_once_and_holds_a_call():
    prose = ToolCallBuffer([WEATHER], forced=False)
    assert prose.feed("  ") == "" and prose.feed("Hello") == "  Hello" and prose.feed(" there") == " there"
    assert prose.finish() == ("", None)
    call = ToolCallBuffer([WEATHER], forced=False)
    assert call.feed('{"name": "get_weather", ') == "" and call.feed('"arguments": {"city": "Oslo"}}') == ""
    rest, calls = call.finish()
    assert rest == "" and calls[0]["function"]["name"] == "get_weather"


def test_call_schema_pins_the_name_of_each_tool():
    other = Tool.model_validate({"function": {"name": "get_time"}})
    schema = call_schema([WEATHER, other])
    assert [variant["properties"]["name"] for variant in schema["anyOf"]] == [
        {"const": "get_weather"},
        {"const": "get_time"},
    ]
    assert call_schema([WEATHER])["properties"]["arguments"] == WEATHER.function.parameters


def test_a_forced_call_cut_by_max_tokens_keeps_name_and_partial_arguments():
    from serve.http.schemas.tools import truncated_tool_call

    tools = [Tool.model_validate({"function": {"name": "calc"}}), Tool.model_validate({"function": {"name": "clock"}})]
    call = truncated_tool_call('{"name": "calc", "arguments": {"a": 1, "b', tools)[0]["function"]
    assert call == {"name": "calc", "arguments": '{"a": 1, "b'}
    assert truncated_tool_call('{"name": "clo', tools)[0]["function"] == {"name": "clock", "arguments": ""}
    assert truncated_tool_call("", tools[1:])[0]["function"]["name"] == "clock"
    buffer = ToolCallBuffer(tools[:1], forced=True)
    buffer.feed('{"name": "calc", "arguments": {"a"')
    rest, calls = buffer.finish(truncated=True)
    assert rest == "" and calls[0]["function"] == {"name": "calc", "arguments": '{"a"'}
    assert buffer.finish(truncated=False) == ('{"name": "calc", "arguments": {"a"', None)  # not cut: not a call
