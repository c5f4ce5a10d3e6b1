"""The Responses API body: what it becomes as a chat completion body, and what is refused (naming the field)."""

import pytest

from serve.errors import ValidationFailed
from serve.http.routes.responses import parse_request
from serve.http.schemas.responses_api_chat import chat_body, chat_messages

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def messages_of(body):
    return chat_messages(parse_request(body))


def refusal(body) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as caught:
        parse_request(body)
    return caught.value


def test_string_input_is_one_user_message_after_the_instructions():
    assert messages_of({"input": "Hi", "instructions": "Be brief."}) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]


def test_message_items_keep_their_roles_and_join_their_text_parts():
    body = {
        "input": [
            {"role": "developer", "content": "Answer in French."},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hello "}, {"type": "input_text", "text": "there"}],
            },
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Bonjour", "annotations": []}],
            },
            {"role": "user", "content": "Again"},
        ]
    }
    assert messages_of(body) == [
        {"role": "system", "content": "Answer in French."},  # developer messages reach the template as system
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Again"},
    ]


def test_function_calls_and_outputs_become_tool_calls_and_tool_messages():
    body = {
        "input": [
            {"role": "user", "content": "Weather in Paris and Tokyo?"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Tokyo"}'},
            {"type": "function_call_output", "call_id": "c1", "output": "18C"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "25C"}]},
        ],
        "tools": [WEATHER],
    }
    user, assistant, first, second = messages_of(body)  # the reasoning item is left out of the prompt
    assert user == {"role": "user", "content": "Weather in Paris and Tokyo?"}
    assert assistant["role"] == "assistant" and assistant["content"] == ""
    assert [(call["id"], call["function"]["arguments"]) for call in assistant["tool_calls"]] == [
        ("c1", '{"city": "Paris"}'),
        ("c2", '{"city": "Tokyo"}'),
    ]
    assert first == {"role": "tool", "tool_call_id": "c1", "name": "get_weather", "content": "18C"}
    assert second == {"role": "tool", "tool_call_id": "c2", "name": "get_weather", "content": "25C"}


def test_an_output_without_its_call_is_refused_naming_the_item():
    with pytest.raises(ValidationFailed) as caught:
        messages_of(
            {
                "input": [
                    {"role": "user", "content": "x"},
                    {"type": "function_call_output", "call_id": "nope", "output": "1"},
                ]
            }
        )
    error = caught.value
    assert error.param == "input[1].call_id" and "'nope'" in error.message


def test_chat_body_carries_the_sampling_tools_format_and_effort():
    body = chat_body(
        parse_request(
            {
                "model": "m",
                "input": "Hi",
                "max_output_tokens": 7,
                "temperature": 0.5,
                "top_p": 0.9,
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "name": "get_weather"},
                "reasoning": {"effort": "low"},
                "prompt_cache_key": "tenant-1",
                "store": False,
                "stream": True,
            }
        )
    )
    assert body["max_completion_tokens"] == 7 and body["temperature"] == 0.5 and body["top_p"] == 0.9
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": WEATHER["parameters"],
            },
        }
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["reasoning_effort"] == "low" and body["prompt_cache_key"] == "tenant-1" and body["stream"] is True
    assert "response_format" not in body


@pytest.mark.parametrize(
    "text, expected",
    [
        ({"format": {"type": "text"}}, None),
        ({"format": {"type": "json_object"}}, {"type": "json_object"}),
        (
            {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": True}},
            {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}},
        ),
    ],
)
def test_text_format_becomes_the_response_format(text, expected):
    assert chat_body(parse_request({"input": "Hi", "text": text})).get("response_format") == expected


@pytest.mark.parametrize(
    "extra, field, words",
    [
        ({"store": True}, "store", "stateless"),
        ({"background": True}, "background", "only false"),
        ({"previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
        ({"conversation": "conv_1"}, "conversation", "stateless"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt", "stored prompt templates"),
        ({"truncation": "auto"}, "truncation", "disabled"),
        ({"tools": [{"type": "web_search"}]}, "tools[0]", "built-in tool type 'web_search'"),
        ({"tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice", "'file_search'"),
        ({"tool_choice": "required"}, "tool_choice", "non-empty tools"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format", "schema: required"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort", "'low'"),
        ({"max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
    ],
)
def test_unsupported_or_invalid_fields_are_refused_by_name(extra, field, words):
    error = refusal({"input": "Hi", **extra})
    assert error.param == field and error.message.startswith(f"{field}: ") and words in error.message
    assert error.status == 422  # written as OpenAI's 400 on /v1/*


@pytest.mark.parametrize(
    "item, field, words",
    [
        (  # an image by URL is the chat step's to judge (a text-only model refuses it there); by file id, here
            {"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]},
            "input[0].content[0]",
            "file store",
        ),
        ({"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}, "input[0].content[0]", "'input_file'"),
        ({"type": "item_reference", "id": "msg_1"}, "input[0]", "item_reference"),
        ({"type": "web_search_call", "id": "ws_1"}, "input[0]", "unsupported input item type"),
        ({"role": "tool", "content": "x"}, "input[0].role", "'assistant'"),
        ({"type": "function_call", "name": "f", "arguments": "{}"}, "input[0].call_id", "Field required"),
    ],
)
def test_input_items_are_refused_with_their_own_location(item, field, words):
    error = refusal({"input": [item]})
    assert error.param == field and words in error.message, error.message
    assert "tagged-union" not in error.message and "~" not in error.message


def test_an_input_image_becomes_a_chat_image_part():
    item = {
        "role": "user",
        "content": [{"type": "input_text", "text": "What?"}, {"type": "input_image", "image_url": "data:x"}],
    }
    parts = chat_messages(parse_request({"input": [item]}))[0]["content"]
    assert parts == [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": "data:x"}}]


def test_store_false_and_unknown_fields_are_accepted():
    req = parse_request({"input": "Hi", "store": False, "include": ["reasoning.encrypted_content"], "user": "u"})
    assert req.store is False and chat_messages(req) == [{"role": "user", "content": "Hi"}]


def test_empty_input_is_refused():
    assert refusal({"input": ""}).param == "input"
    assert refusal({"input": []}).param == "input"
    assert refusal({}).param == "input"
