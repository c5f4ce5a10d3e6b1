"""Grammars cannot exhaust the engine: each compiles within GRAMMAR_* limits, is refused at the edge past one (a 4xx
naming the field and the limit, nothing admitted), and the engine builds matchers on worker threads, off its step."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest

from serve.app import create_app
from serve.config import SettingsError, load_settings
from serve.engine.grammar import GrammarCheck, GrammarError, MatcherCompiler, json_schema_grammar, regex_grammar
from serve.engine.types import FinishReason, GrammarLimits, Request, SamplingParams
from serve.wiring import engine_config

EXPLOSIVE_REGEX = "a{1000}{1000}"  # a million-character lexeme: gigabytes of lexer states at llguidance's defaults
CHAT = "/v1/chat/completions"


def wide_schema(properties: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(properties)}}


def test_an_explosive_regex_is_refused_by_the_dry_run_over_the_vocabulary(tiny_engine):
    GrammarCheck().check(regex_grammar(EXPLOSIVE_REGEX))  # it compiles: lexing work starts with the first tokens
    with pytest.raises(GrammarError, match="over GRAMMAR_LEXER_FUEL=100000") as refused:
        GrammarCheck(hf_tokenizer=lambda: tiny_engine.tokenizer).check(regex_grammar(EXPLOSIVE_REGEX))
    assert "too complex" in str(refused.value)


def test_ordinary_grammars_pass_the_default_limits(tiny_engine):
    check = GrammarCheck(hf_tokenizer=lambda: tiny_engine.tokenizer)
    check.check(regex_grammar("[0-9]{4}"))
    check.check(regex_grammar("(yes|no|maybe){1,20}"))
    check.check(regex_grammar("[a-z]{0,100000}"))
    check.check(json_schema_grammar(wide_schema(200)))


def test_a_ten_thousand_property_schema_is_refused_without_a_vocabulary():
    with pytest.raises(GrammarError, match="over GRAMMAR_LEXER_FUEL=100000"):
        GrammarCheck().check(json_schema_grammar(wide_schema(10_000)))
    with pytest.raises(GrammarError, match="over GRAMMAR_MAX_SIZE=2000"):
        GrammarCheck(GrammarLimits(max_size=2_000)).check(json_schema_grammar(wide_schema(2_000)))


def test_each_limit_is_a_setting_that_reaches_both_sides():
    settings = load_settings(
        {"GRAMMAR_MAX_SIZE": "1000", "GRAMMAR_LEXER_FUEL": "2000", "GRAMMAR_MAX_LEXER_STATES": "300"}
    )
    assert settings.grammar_limits == GrammarLimits(max_size=1000, lexer_fuel=2000, max_lexer_states=300)
    assert engine_config(settings).grammar_limits == settings.grammar_limits
    assert load_settings({}).grammar_limits == GrammarLimits()
    with pytest.raises(SettingsError, match="GRAMMAR_MAX_LEXER_STATES"):
        load_settings({"GRAMMAR_MAX_LEXER_STATES": "many"})


EXPLOSIVE_SCHEMA = {"type": "string", "pattern": f"^{EXPLOSIVE_REGEX}$"}  # JSON Schema patterns are unanchored
TGI_BODY = {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": EXPLOSIVE_REGEX}}}
CHAT_BODY = {
    "messages": [{"role": "user", "content": "x"}],
    "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": EXPLOSIVE_SCHEMA}},
}


@pytest.mark.parametrize(
    "path, body, status, field",
    [("/generate", TGI_BODY, 422, "parameters.grammar"), (CHAT, CHAT_BODY, 400, "response_format")],
)
def test_32_explosive_grammars_are_refused_before_admission(tiny_settings, tiny_engine, path, body, status, field):
    client = create_app(replace(tiny_settings, messages_api_enabled=True), tiny_engine).test_client()
    admitted = tiny_engine.served
    for _ in range(32):
        response = client.post(path, json=body)
        assert response.status_code == status, response.get_data(as_text=True)[:300]
        text = json.dumps(response.json)
        assert field in text and "GRAMMAR_" in text, text
    assert tiny_engine.served == admitted  # nothing reached the engine: no matcher was built, no memory held
    assert tiny_engine.matchers.compiling == 0
    ok = client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
    assert ok.status_code == 200


def test_the_engine_builds_matchers_off_its_step(tiny_engine, monkeypatch):
    threads: list[str] = []
    build = tiny_engine.grammars.matcher

    def recording(grammar):
        threads.append(threading.current_thread().name)
        return build(grammar)

    monkeypatch.setattr(tiny_engine.grammars, "matcher", recording)
    params = SamplingParams(max_new_tokens=4, grammar=regex_grammar("[0-9]{3}"))
    stream = tiny_engine.submit(Request(prompt_ids=[1, 2, 3], params=params))
    events = list(stream)
    assert threads and all(name.startswith("grammar") for name in threads), threads
    assert events[-1].finish_reason is not None and events[-1].error is None
    assert "".join(event.text for event in events).isdigit()


def test_a_grammar_past_a_limit_mid_generation_ends_its_request_alone(tiny_engine):
    """Straight to the engine (the front would refuse it): a lexer step past its fuel ends that request with an
    error naming the setting, and the request batched with it finishes untouched."""
    explosive = SamplingParams(max_new_tokens=8, grammar=regex_grammar(EXPLOSIVE_REGEX))
    bad = tiny_engine.submit(Request(prompt_ids=[1, 2, 3], params=explosive))
    good = tiny_engine.submit(Request(prompt_ids=[1, 2, 3], params=SamplingParams(max_new_tokens=4)))
    bad_final, good_events = list(bad)[-1], list(good)
    assert bad_final.finish_reason is FinishReason.ERROR and "GRAMMAR_LEXER_FUEL" in bad_final.error, bad_final
    assert good_events[-1].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert good_events[-1].error is None and good_events[-1].generated_tokens >= 1


class GatedGrammars:
    """A stand-in for Grammars whose matchers are built only once the test opens the gate."""

    def __init__(self, fail: bool = False):
        self.gate = threading.Event()
        self.fail = fail

    def matcher(self, grammar):
        self.gate.wait(30)
        if self.fail:
            raise GrammarError("the grammar is too complex: over GRAMMAR_MAX_LEXER_STATES=1")
        return f"matcher for {grammar}"


class Queue:
    """Records what the compiler adds and cancels, as the scheduler would receive them."""

    def __init__(self):
        self.added: list[str] = []
        self.cancelled: list[str] = []
        self.changed = threading.Event()

    def add(self, request):
        self.added.append(request.id)
        self.changed.set()

    def cancel(self, request_id):
        self.cancelled.append(request_id)


def constrained(request_id: str) -> Request:
    return Request(prompt_ids=[1], params=SamplingParams(grammar="start: /a/"), id=request_id)


def test_a_request_joins_the_queue_only_once_its_matcher_is_built():
    grammars, queue = GatedGrammars(), Queue()
    compiler = MatcherCompiler(grammars)
    compiler.submit(Request(prompt_ids=[1], params=SamplingParams(), id="plain"), queue.add, queue.cancel)
    compiler.submit(constrained("json"), queue.add, queue.cancel)
    assert queue.added == ["plain"] and compiler.compiling == 1
    grammars.gate.set()
    queue.changed.clear()
    assert queue.changed.wait(30)
    assert queue.added == ["plain", "json"] and compiler.compiling == 0
    assert compiler.take(constrained("json")) == "matcher for start: /a/"
    assert compiler.take(Request(prompt_ids=[1], params=SamplingParams())) is None


def test_a_request_cancelled_while_compiling_is_queued_cancelled_and_keeps_no_matcher():
    grammars, queue = GatedGrammars(), Queue()
    compiler = MatcherCompiler(grammars)
    compiler.submit(constrained("gone"), queue.add, queue.cancel)
    compiler.cancel("gone")
    grammars.gate.set()
    assert queue.changed.wait(30)
    assert queue.added == ["gone"] and queue.cancelled == ["gone"]
    with pytest.raises(GrammarError):
        compiler.take(constrained("gone"))


def test_a_compile_error_fails_its_request_when_it_starts():
    grammars, queue = GatedGrammars(fail=True), Queue()
    compiler = MatcherCompiler(grammars)
    compiler.submit(constrained("bad"), queue.add, queue.cancel)
    grammars.gate.set()
    assert queue.changed.wait(30)
    with pytest.raises(GrammarError, match="GRAMMAR_MAX_LEXER_STATES"):
        compiler.take(constrained("bad"))
    compiler.discard("bad")  # nothing left to drop
