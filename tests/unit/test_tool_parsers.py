"""Tool-call parsers per family, on answers written as each family's models emit them, whole and streamed.

Special marker tokens (``<|python_tag|>``, ``[TOOL_CALLS]``) appear as text: serve.front.chat_output.event_text puts
them back in from their token ids, since the detokenizer skips special tokens.
"""

import json

import pytest

from serve.front.chat_output import OutputDelta, event_text, marker_tokens, output_format, parse_text
from serve.engine import TokenEvent

TOOLS = ["get_weather", "get_time"]
WEATHER = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
TIME = {"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}

# Qwen2.5-7B-Instruct / Hermes-3: two calls in one turn, each in its own tag.
HERMES = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>'
)
# Qwen3-8B: thoughts, a sentence, then a call.
QWEN3 = (
    "<think>\nThe user wants the weather in Paris. I'll call get_weather.\n</think>\n\n"
    "Let me look that up.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
)
# Llama-3.1-8B-Instruct: a JSON call after <|python_tag|>, and a plain JSON one (its template asks for "parameters").
LLAMA3_TAGGED = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
LLAMA3_PLAIN = '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}'
LLAMA3_TWO = (
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
    '{"name": "get_time", "parameters": {"timezone": "Europe/Paris"}}'
)
# Mistral-7B-Instruct-v0.3: a JSON list; Mistral-Small-3.2 / Magistral (tokenizer v11+): name[ARGS]{...}.
MISTRAL_LIST = (
    '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
    '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}]'
)
MISTRAL_ARGS = (
    '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}'
    '[TOOL_CALLS]get_time[ARGS]{"timezone": "Europe/Paris"}'
)
# Llama-4-Scout-17B-16E-Instruct: a pythonic list.
PYTHONIC = '[get_weather(city="Paris", unit="celsius"), get_time(timezone="Europe/Paris")]'
# gpt-oss-20b: analysis, then a commentary message to functions.get_weather.
GPT_OSS = (
    "<|channel|>analysis<|message|>Need to call get_weather for Paris.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    '{"city":"Paris","unit":"celsius"}<|call|>'
)

CASES = [
    ("hermes", HERMES, "", [WEATHER, TIME]),
    ("hermes", QWEN3, "Let me look that up.\n", [WEATHER]),
    ("llama3_json", LLAMA3_TAGGED, "", [WEATHER]),
    ("llama3_json", LLAMA3_PLAIN, "", [WEATHER]),
    ("llama3_json", LLAMA3_TWO, "", [WEATHER, TIME]),
    ("mistral", MISTRAL_LIST, "", [WEATHER, TIME]),
    ("mistral", MISTRAL_ARGS, "", [WEATHER, TIME]),
    ("pythonic", PYTHONIC, "", [WEATHER, TIME]),
    ("gpt_oss", GPT_OSS, "", [WEATHER]),
]


def streamed(parser, text: str, step: int, truncated: bool = False) -> OutputDelta:
    whole = OutputDelta()
    for start in range(0, len(text), step):
        whole += parser.feed(text[start : start + step])
    whole += parser.finish(truncated)
    return whole


def calls_of(delta: OutputDelta) -> list[dict]:
    return [{"name": call.name, "arguments": json.loads(call.arguments)} for call in delta.tool_calls]


@pytest.mark.parametrize("family, answer, content, calls", CASES)
def test_each_family_reads_its_calls_whole_and_streamed(family, answer, content, calls):
    form = output_format("auto", family, "")
    reasoning_form = output_format("qwen3", family, "") if answer is QWEN3 else form
    whole = parse_text(reasoning_form.parser(TOOLS), answer)
    assert (whole.content, calls_of(whole)) == (content, calls)
    ids = [call.id for call in whole.tool_calls]
    assert len(set(ids)) == len(ids) and all(ids)
    for step in (1, 2, 3, 7, 11):
        parts = streamed(reasoning_form.parser(TOOLS), answer, step)
        assert (parts.content, calls_of(parts)) == (content, calls), step
    assert form.tool_call_parser == family


def test_mistral_ids_are_what_its_templates_take_back():
    (first, second) = parse_text(output_format("none", "mistral", "").parser(TOOLS), MISTRAL_ARGS).tool_calls
    assert len(first.id) == 9 and first.id.isalnum() and first.id != second.id


@pytest.mark.parametrize(
    "family, malformed",
    [
        ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>'),
        ("hermes", '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>'),
        ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": '),
        ("mistral", "[TOOL_CALLS]get_weather[ARGS]{'city': 'Paris'}"),
        ("pythonic", '[get_weather(city="Paris"), os.system("ls")]'),
        ("pythonic", '[get_weather(city=open("/etc/passwd").read())]'),
    ],
)
def test_a_malformed_call_comes_back_as_text(family, malformed):
    form = output_format("none", family, "")
    for step in (1, 4, 1000):
        parts = streamed(form.parser(TOOLS), malformed, step)
        assert (parts.content, parts.tool_calls) == (malformed, []), step


def test_prose_streams_at_once_and_a_marker_split_across_deltas_is_held_back():
    parser = output_format("none", "hermes", "").parser(TOOLS)
    assert parser.feed("It is sunny. ").content == "It is sunny. "
    assert parser.feed("<tool").content == ""  # may be the start of <tool_call>
    assert parser.feed("box> is not a call").content == "<toolbox> is not a call"
    assert parser.finish().content == ""


def test_text_before_and_after_hermes_calls_is_content_and_each_call_streams_when_it_closes():
    parser = output_format("none", "hermes", "").parser(TOOLS)
    first = parser.feed("Checking.\n" + HERMES.split("\n<tool_call>")[0])
    assert first.content == "Checking.\n" and [call.name for call in first.tool_calls] == ["get_weather"]
    rest = parser.feed("\n<tool_call>" + HERMES.split("\n<tool_call>")[1] + " Done.")
    rest += parser.finish()
    assert [call.name for call in rest.tool_calls] == ["get_time"] and rest.content.strip() == "Done."


def test_without_tools_no_call_is_read():
    answer = parse_text(output_format("none", "hermes", "").parser([]), HERMES)
    assert answer.content == HERMES and answer.tool_calls == []


def test_the_template_names_the_tool_format():
    assert output_format("auto", "auto", "{{ '<tool_call>' }}").tool_call_parser == "hermes"
    assert output_format("auto", "auto", "<|python_tag|>").tool_call_parser == "llama3_json"
    assert output_format("auto", "auto", "[TOOL_CALLS]").tool_call_parser == "mistral"
    assert output_format("auto", "auto", "<|python_start|>").tool_call_parser == "pythonic"
    assert output_format("auto", "auto", "<|channel|>").tool_call_parser == "gpt_oss"
    assert output_format("auto", "auto", "{{ messages }}").tool_call_parser == "json"


def test_a_forced_call_is_read_after_the_thoughts_and_keeps_partial_arguments_when_cut():
    form = output_format("qwen3", "hermes", "")
    forced = parse_text(
        form.parser(["get_weather"], forced=True),
        '<think>\nok\n</think>\n\n{"name": "get_weather", "arguments": {"city": "Paris"}}',
    )
    assert forced.reasoning == "\nok\n" and calls_of(forced) == [
        {"name": "get_weather", "arguments": {"city": "Paris"}}
    ]
    cut = parse_text(form.parser(["get_weather"], forced=True), '{"name": "get_weather", "arguments": {"ci', True)
    assert (cut.tool_calls[0].name, cut.tool_calls[0].arguments) == ("get_weather", '{"ci')


def test_special_marker_tokens_are_put_back_from_their_ids(tmp_path, embedded_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_folder))
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    markers = marker_tokens(tokenizer, output_format("none", "mistral", "").markers)
    marker_id = tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")
    assert markers == {marker_id: "[TOOL_CALLS]"}
    assert event_text(TokenEvent(marker_id, ""), markers) == "[TOOL_CALLS]"
    assert event_text(TokenEvent(5, "abc"), markers) == "abc"
