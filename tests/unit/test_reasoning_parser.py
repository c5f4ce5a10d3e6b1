"""Reasoning parsers: thoughts apart from the answer, whole and streamed in every split, and after-thoughts grammars.

The answers below are written as each family's models emit them (the text the detokenizer hands the front; special
marker tokens such as harmony's are restored from their token ids by serve.front.chat_output.event_text).
"""

import json

import pytest

from serve.front.chat_output import OutputDelta, output_format, parse_text, template_text
from serve.front.reasoning import grammar_after_thoughts, prompt_opens_thoughts

QWEN3_TEMPLATE = "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{%- endif %}"
R1_TEMPLATE = "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
GPT_OSS_TEMPLATE = "<|start|>assistant<|channel|>final<|message|>{{ content }}<|end|>"

# Qwen3-8B, thinking on: the model writes <think> itself.
QWEN3_ANSWER = (
    "<think>\nOkay, the user is asking for the capital of France. That's Paris. I should answer briefly.\n</think>\n\n"
    "The capital of France is **Paris**."
)
# DeepSeek-R1-Distill-Qwen-7B: the template opened the thoughts, so the answer starts inside them.
R1_ANSWER = (
    "Okay, so I need to find 2 + 3. Adding them gives 5. Let me double-check: 2 + 3 = 5.\n</think>\n\n"
    "The sum of 2 and 3 is \\(\\boxed{5}\\)."
)
# gpt-oss-20b (harmony): analysis channel, then the final one.
GPT_OSS_ANSWER = (
    "<|channel|>analysis<|message|>User asks the capital of France. Simple: Paris.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>The capital of France is Paris.<|return|>"
)


def streamed(parser, text: str, step: int, truncated: bool = False) -> OutputDelta:
    whole = OutputDelta()
    for start in range(0, len(text), step):
        whole += parser.feed(text[start : start + step])
    whole += parser.finish(truncated)
    return whole


def test_the_template_names_the_family():
    assert output_format("auto", "auto", QWEN3_TEMPLATE).reasoning_parser == "qwen3"
    assert output_format("auto", "auto", R1_TEMPLATE).reasoning_parser == "deepseek_r1"
    assert output_format("auto", "auto", GPT_OSS_TEMPLATE).reasoning_parser == "gpt_oss"
    assert output_format("auto", "auto", "{{ messages }}").reasoning_parser == "none"
    assert output_format("qwen3", "auto", "{{ messages }}").reasoning_parser == "qwen3"  # the setting wins
    assert output_format("none", "auto", QWEN3_TEMPLATE).reasoning_parser == "none"
    assert template_text({"default": "a", "tool_use": "<think>"}).endswith("<think>")


@pytest.mark.parametrize(
    "family, template, answer, opened, thoughts, content",
    [
        ("qwen3", QWEN3_TEMPLATE, QWEN3_ANSWER, False, "That's Paris.", "The capital of France is **Paris**."),
        ("deepseek_r1", R1_TEMPLATE, R1_ANSWER, True, "2 + 3 = 5.", "The sum of 2 and 3 is \\(\\boxed{5}\\)."),
        ("gpt_oss", GPT_OSS_TEMPLATE, GPT_OSS_ANSWER, False, "Simple: Paris.", "The capital of France is Paris."),
    ],
)
def test_thoughts_and_answer_part_whole_and_in_every_split(family, template, answer, opened, thoughts, content):
    form = output_format("auto", "auto", template)
    whole = parse_text(form.parser([], opened=opened), answer)
    assert thoughts in whole.reasoning and "<" not in whole.reasoning.replace("\\(", "")
    assert whole.content == content
    for step in (1, 2, 3, 5, 8, 13):  # every marker split across deltas somewhere
        parts = streamed(form.parser([], opened=opened), answer, step)
        assert (parts.reasoning, parts.content) == (whole.reasoning, whole.content), step


@pytest.mark.parametrize("cut", range(1, 40))
def test_a_budget_that_ends_in_the_thoughts_leaves_no_half_marker_and_no_content(cut):
    form = output_format("qwen3", "none", "")
    text = QWEN3_ANSWER[: QWEN3_ANSWER.index("</think>") + 1 + cut % 8]  # ends inside "</think>" or just before
    text = text if cut < 8 else QWEN3_ANSWER[: 8 + cut]  # ... or anywhere early in the thoughts
    for step in (1, 4, 1000):
        parts = streamed(form.parser([]), text, step, truncated=True)
        assert parts.content == ""
        assert not any(parts.reasoning.endswith("</think>"[:size]) for size in range(2, 9)), parts.reasoning
        assert "<think>" not in parts.reasoning and "Okay"[: max(len(text) - 8, 0)] in parts.reasoning


def test_deepseek_r1_answer_without_end_marker_is_all_thoughts_and_a_repeated_start_marker_is_dropped():
    form = output_format("deepseek_r1", "none", "")
    assert parse_text(form.parser([], opened=True), "still thinking about it", truncated=True).content == ""
    repeated = parse_text(form.parser([], opened=True), "<think>\nHmm.\n</think>\n\nYes.")
    assert (repeated.reasoning, repeated.content) == ("\nHmm.\n", "Yes.")


def test_qwen3_with_thinking_off_answers_as_content():
    form = output_format("qwen3", "none", "")
    assert not form.opens_thoughts("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert form.opens_thoughts("<｜Assistant｜><think>\n")
    plain = parse_text(form.parser([]), "Paris is the capital of France.")
    assert (plain.reasoning, plain.content) == ("", "Paris is the capital of France.")


def test_gpt_oss_budget_ending_in_the_analysis_channel_has_no_content_and_no_marker():
    form = output_format("gpt_oss", "gpt_oss", "")
    cut = GPT_OSS_ANSWER[: GPT_OSS_ANSWER.index("<|end|>") + 3]
    parts = streamed(form.parser([]), cut, 2, truncated=True)
    assert parts.content == "" and parts.reasoning == "User asks the capital of France. Simple: Paris."


def _grammar(schema: dict) -> str:
    from serve.engine.grammar import json_schema_grammar

    return json_schema_grammar(schema)


@pytest.fixture(scope="module")
def vocabulary(embedded_folder):
    import llguidance.hf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(embedded_folder))
    return tokenizer, llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer))


def _accepts(vocabulary, grammar: str, text: str) -> bool:
    import llguidance

    tokenizer, lexicon = vocabulary
    matcher = llguidance.LLMatcher(lexicon, grammar, log_level=0)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return all(matcher.consume_token(token) for token in ids) and matcher.is_accepting()


def test_a_grammar_after_the_thoughts_leaves_them_free_and_constrains_the_answer(vocabulary):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    opened = grammar_after_thoughts(_grammar(schema), opened=True)
    assert _accepts(vocabulary, opened, 'The user wants {JSON} "now" </think>\n\n{"city":"Paris"}')
    assert not _accepts(vocabulary, opened, "thoughts</think>\n\nParis")  # the answer is still held to the schema
    assert not _accepts(vocabulary, opened, '{"city":"Paris"}')  # the prompt opened thoughts: they must close
    optional = grammar_after_thoughts(_grammar(schema), opened=False)
    assert _accepts(vocabulary, optional, '<think>\nhm\n</think>\n\n{"city":"Oslo"}')
    assert _accepts(vocabulary, optional, '{"city":"Oslo"}')
    assert json.loads(optional)["grammars"][0]["name"] == "after_thoughts"
    assert prompt_opens_thoughts("<think>\n") and not prompt_opens_thoughts("<think></think>")
