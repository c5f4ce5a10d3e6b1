"""Constrained decoding with llguidance: grammars are checked at the edge, then mask each step's logits.

The front checks a grammar without the model's vocabulary (``GrammarCheck``); only the engine builds the
vocabulary (``Grammars``, about a second for 49k tokens), for the matchers that mask its logits. Both compile
under the same ``GrammarLimits`` (size, lexer fuel, lexer states), so a grammar that would cost the engine too
much time or memory is refused at the edge, before it is admitted. The engine builds each matcher on a worker
thread (``MatcherCompiler``): a request joins the scheduler once its matcher is ready, and no step waits on it.

llguidance was picked over xgrammar because it is a 3 MB wheel with no dependencies (xgrammar pulls in a 286 MB
triton wheel that a CPU image never uses), it compiles JSON schemas, regexes and Lark grammars lazily (no
up-front compile time per schema), and computes a token mask in tens of microseconds.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence, Union

import llguidance  # pure Rust extension: importing it pulls in neither torch nor transformers

from serve.engine.types import GrammarLimits, Request

BITS = 32  # tokens per word of llguidance's bitmask (int32 words, lowest bit first)

# Compact JSON (no free-form whitespace between tokens): a model cannot stall in an endless run of spaces.
_JSON_OPTIONS = {"whitespace_flexible": False}
COMPILE_WORKERS = 2  # matchers compiled at once in an engine process (each within the limits)

DRY_RUN_TOKENS = 2  # tokens the front's check feeds a matcher: where a regex that explodes spends its fuel

# words of llguidance's limit errors -> the setting that raises that limit
_LIMIT_WORDS = (
    ("grammar size", "GRAMMAR_MAX_SIZE", "max_size"),
    ("too big", "GRAMMAR_LEXER_FUEL", "lexer_fuel"),  # the initial lexer's regexes took more than its fuel
    ("too many expressions", "GRAMMAR_LEXER_FUEL", "lexer_fuel"),  # a lexer step ran out of fuel
    ("too many states", "GRAMMAR_MAX_LEXER_STATES", "max_lexer_states"),
)


class GrammarError(ValueError):
    """A schema, regex or grammar that cannot be compiled, or that is past a limit."""


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


def parser_limits(limits: GrammarLimits) -> llguidance.LLParserLimits:
    """llguidance's limits for ``limits`` (errors never quote the grammar back)."""
    return llguidance.LLParserLimits(
        max_grammar_size=limits.max_size,
        initial_lexer_fuel=limits.lexer_fuel,
        max_lexer_states=limits.max_lexer_states,
        verbose_errors=False,
    )


def grammar_error(message: str, limits: Optional[GrammarLimits] = None) -> GrammarError:
    """A GrammarError with llguidance's first line; one past a limit names the setting that raises it (and its
    value, when ``limits`` is known)."""
    first = message.strip().splitlines()[0] if message.strip() else "the grammar does not compile"
    lowered = first.lower()
    for words, setting, field in _LIMIT_WORDS:
        if words in lowered:
            value = f"={getattr(limits, field)}" if limits is not None else ""
            return GrammarError(f"the grammar is too complex: over {setting}{value} ({first})")
    return GrammarError(first)


def grammar_failure(matcher: llguidance.LLMatcher) -> str:
    """Why a matcher stopped in the middle of a generation (a lexer step past its limits), naming the setting."""
    return f"GrammarError: {grammar_error(matcher.get_error())}"


def first_allowed(mask: bytes, skip: frozenset[int]) -> Optional[int]:
    """The lowest token id a bitmask allows, other than those in ``skip`` (None when there is none)."""
    start = len(mask) - len(mask.lstrip(b"\x00"))
    for index in range(start, len(mask)):
        byte = mask[index]
        while byte:
            low = byte & -byte
            token = index * 8 + low.bit_length() - 1
            if token not in skip:
                return token
            byte ^= low
    return None


def dry_run(grammar: str, tokenizer: llguidance.LLTokenizer, limits: GrammarLimits, eos: frozenset[int]) -> None:
    """Feed a fresh matcher ``DRY_RUN_TOKENS`` allowed tokens over a real vocabulary; raise GrammarError when a step
    goes past a limit (lexing work happens as tokens are matched, not when a grammar compiles)."""
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=parser_limits(limits))
    for _ in range(DRY_RUN_TOKENS):
        token = None if matcher.is_error() else first_allowed(matcher.compute_bitmask(), eos)
        if token is None or matcher.is_error():
            break
        matcher.consume_token(token)
    if matcher.is_error():
        raise grammar_error(matcher.get_error(), limits)


def check_grammar(
    grammar: str, tokenizer: Optional[llguidance.LLTokenizer] = None, limits: GrammarLimits = GrammarLimits()
) -> None:
    """Raise GrammarError with llguidance's message when ``grammar`` does not compile within ``limits`` (against
    ``tokenizer``'s vocabulary when given; without one, everything but token references is checked)."""
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer, limits=parser_limits(limits))
    if error:
        raise grammar_error(error, limits)


class GrammarCheck:
    """The front's grammar check: compiles a grammar within ``limits`` (the schemas and regexes clients send hold no
    token references), then, given the front's own tokenizer (``hf_tokenizer`` returns it, or None while it is not
    loaded), dry-runs it over that vocabulary, built once."""

    def __init__(self, limits: GrammarLimits = GrammarLimits(), hf_tokenizer: Optional[Callable[[], Any]] = None):
        self.limits = limits
        self._hf_tokenizer = hf_tokenizer
        self._vocabulary: Optional[tuple[llguidance.LLTokenizer, frozenset[int]]] = None
        self._lock = threading.Lock()

    def check(self, grammar: str) -> None:
        check_grammar(grammar, limits=self.limits)
        vocabulary = self._vocabulary_once()
        if vocabulary is not None:
            dry_run(grammar, vocabulary[0], self.limits, vocabulary[1])

    def _vocabulary_once(self) -> Optional[tuple[llguidance.LLTokenizer, frozenset[int]]]:
        """The front tokenizer's vocabulary as llguidance sees it, and its end-of-text ids (built once)."""
        with self._lock:
            hf_tokenizer = self._hf_tokenizer() if self._vocabulary is None and self._hf_tokenizer else None
            if hf_tokenizer is not None:
                import llguidance.hf

                eos = frozenset(i for i in (hf_tokenizer.eos_token_id,) if i is not None)
                self._vocabulary = (llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=len(hf_tokenizer)), eos)
            return self._vocabulary


GRAMMAR_CHECK = GrammarCheck()


class Grammars:
    """The model's vocabulary as llguidance sees it: checks grammars, makes matchers, masks logits."""

    def __init__(
        self, hf_tokenizer: Any, vocab_size: int, eos_ids: Sequence[int], limits: GrammarLimits = GrammarLimits()
    ):
        import llguidance.hf
        import llguidance.torch

        self._masks = llguidance.torch
        self.limits = limits
        eos = sorted(eos_ids) or None
        self._tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=eos)

    def check(self, grammar: str) -> None:
        """Raise GrammarError with llguidance's message when ``grammar`` does not compile within the limits."""
        check_grammar(grammar, self._tokenizer, self.limits)

    def matcher(self, grammar: Optional[str]) -> Optional[llguidance.LLMatcher]:
        """A fresh matcher for one sequence (None when it is unconstrained); GrammarError when it does not compile
        within the limits."""
        if grammar is None:
            return None
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=parser_limits(self.limits))
        matcher.compute_bitmask()  # the lexer's first states, built here (a worker thread) rather than in a step
        if matcher.is_error():
            raise grammar_error(matcher.get_error(), self.limits)
        return matcher

    def mask(self, logits: Any, matchers: Sequence[Optional[llguidance.LLMatcher]], uploads: Any = None) -> Any:
        """Set to -inf, in place and on the logits' device, the logits of tokens each row's grammar does not allow
        next. The matchers (host objects) fill llguidance's bitmask in a staging buffer of ``uploads``
        (serve.engine.uploads.Uploads; pinned on CUDA), which goes to the device in one non-blocking copy: no
        logits row comes to the host."""
        import torch

        from serve.engine.uploads import default_uploads

        rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
        if not rows:
            return logits
        uploads = default_uploads(logits.device, uploads)
        staged = uploads.stage(self._masks.get_bitmask_shape(len(rows), logits.shape[-1]), torch.int32)
        staged.host.fill_(-1)  # words past the matchers' vocabulary allow every token, as a fresh bitmask does
        for index, row in enumerate(rows):
            self._masks.fill_next_token_bitmask(matchers[row], staged.host, index)
        bitmask = staged.send()
        apply_bitmask(logits, uploads.tensor(rows, torch.long), bitmask)
        return logits


def apply_bitmask(logits: Any, rows: Any, bitmask: Any) -> None:
    """Set ``logits[rows[i], token]`` to -inf where bit ``token`` of ``bitmask[i]`` is clear, on the logits' device
    (a few elementwise kernels: no host read, no compile step)."""
    import torch

    shifts = torch.arange(BITS, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).view(bitmask.shape[0], -1)[:, : logits.shape[-1]].bool()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


Outcome = Union[llguidance.LLMatcher, Exception]


class MatcherCompiler:
    """Builds constrained requests' matchers on worker threads, off the engine's step.

    ``submit`` queues an unconstrained request at once, a constrained one once its matcher is built; the engine
    thread then ``take``s the matcher when the request starts (a compile error fails that request alone). A
    request cancelled while compiling is queued and cancelled together, so it ends as any cancelled request does.
    """

    def __init__(self, grammars: Grammars, workers: int = COMPILE_WORKERS):
        self._grammars = grammars
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="grammar")
        self._lock = threading.Lock()
        self._compiling: dict[str, bool] = {}  # request id -> cancelled while compiling
        self._built: dict[str, Outcome] = {}  # request id -> its matcher (or error), until it starts or ends

    @property
    def compiling(self) -> int:
        with self._lock:
            return len(self._compiling)

    def submit(self, request: Request, add: Callable[[Request], None], cancel: Callable[[str], None]) -> None:
        """``add`` the request to the queue now (unconstrained) or once its matcher is built, then ``cancel`` it
        if it was cancelled meanwhile."""
        grammar = request.params.grammar
        if grammar is None:
            add(request)
            return
        with self._lock:
            self._compiling[request.id] = False
        self._pool.submit(self._build, request, grammar, add, cancel)

    def _build(self, request: Request, grammar: str, add: Callable, cancel: Callable) -> None:
        try:
            outcome: Outcome = self._grammars.matcher(grammar)
        except Exception as exc:  # noqa: BLE001 - the request fails alone when it starts
            outcome = exc
        with self._lock:  # held while queueing, so that a cancel is either seen here or reaches the queue
            cancelled = self._compiling.pop(request.id)
            if not cancelled:
                self._built[request.id] = outcome
            add(request)
            if cancelled:
                cancel(request.id)

    def cancel(self, request_id: str) -> None:
        """Mark a request that is still compiling as cancelled (others are the scheduler's to cancel)."""
        with self._lock:
            if request_id in self._compiling:
                self._compiling[request_id] = True

    def take(self, request: Request) -> Optional[llguidance.LLMatcher]:
        """The request's built matcher (None when unconstrained); raises its compile error."""
        if request.params.grammar is None:
            return None
        with self._lock:
            outcome = self._built.pop(request.id, None)
        if outcome is None:
            raise GrammarError("the grammar's matcher was not built")
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def discard(self, request_id: str) -> None:
        """Drop a request's matcher if it ended before starting (cancelled while queued)."""
        with self._lock:
            self._built.pop(request_id, None)
