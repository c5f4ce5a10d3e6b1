"""Constrained decoding with llguidance: grammars are checked at the edge, then mask each step's logits.

The front checks a grammar without the model's vocabulary (``GRAMMAR_CHECK``); only the engine builds the
vocabulary (``Grammars``, about a second for 49k tokens), for the matchers that mask its logits.

llguidance was picked over xgrammar because it is a 3 MB wheel with no dependencies (xgrammar pulls in a 286 MB
triton wheel that a CPU image never uses), it compiles JSON schemas, regexes and Lark grammars lazily (no
up-front compile time per schema), and computes a token mask in tens of microseconds.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

import llguidance  # pure Rust extension: importing it pulls in neither torch nor transformers

# Compact JSON (no free-form whitespace between tokens): a model cannot stall in an endless run of spaces.
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A schema, regex or grammar that cannot be compiled."""


def json_schema_grammar(schema: Any) -> str:
    """Grammar text for JSON that validates against ``schema`` (a dict, or True for any JSON object)."""
    if schema is True:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, not {type(schema).__name__}")
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise GrammarError(str(exc)) from None


def regex_grammar(pattern: str) -> str:
    """Grammar text for output that matches ``pattern`` in full."""
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def check_grammar(grammar: str, tokenizer: Optional[llguidance.LLTokenizer] = None) -> None:
    """Raise GrammarError with llguidance's message when ``grammar`` does not compile (against ``tokenizer``'s
    vocabulary when given; without one, everything but token references is checked)."""
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        raise GrammarError(error.strip().splitlines()[0])


class GrammarCheck:
    """The front's grammar check: compiles a grammar with no vocabulary (the schemas and regexes clients send hold
    no token references)."""

    def check(self, grammar: str) -> None:
        check_grammar(grammar)


GRAMMAR_CHECK = GrammarCheck()


class Grammars:
    """The model's vocabulary as llguidance sees it: checks grammars, makes matchers, masks logits."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]):
        import llguidance.hf
        import llguidance.torch

        self._masks = llguidance.torch
        eos = sorted(eos_ids) or None
        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos)

    def check(self, grammar: str) -> None:
        """Raise GrammarError with llguidance's message when ``grammar`` does not compile."""
        check_grammar(grammar, self._tokenizer)

    def matcher(self, grammar: Optional[str]) -> Optional[llguidance.LLMatcher]:
        """A fresh matcher for one sequence (None when it is unconstrained)."""
        return None if grammar is None else llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)

    def mask(self, logits: Any, matchers: Sequence[Optional[llguidance.LLMatcher]]) -> Any:
        """Set to -inf, in place, the logits of tokens each row's grammar does not allow next."""
        rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
        if not rows:
            return logits
        bitmask = self._masks.allocate_token_bitmask(len(rows), logits.shape[-1])
        for index, row in enumerate(rows):
            self._masks.fill_next_token_bitmask(matchers[row], bitmask, index)
        selected = logits[rows].cpu()
        self._masks.apply_token_bitmask_inplace(selected, bitmask)
        logits[rows] = selected.to(logits.device)
        return logits
