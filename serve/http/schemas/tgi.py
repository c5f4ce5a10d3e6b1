"""TGI ``/generate`` requests (``{"inputs": ..., "parameters": {...}}``) and the bodies TGI clients expect.

Response models first, then their builders: ``stream_details`` builds its model and dumps it; ``token`` and
``stream_token`` (once per token) and ``details`` (a list per token) write the model's dump directly, as the model
costs several times as much there. tests/unit/test_response_bodies.py holds each equal to its model's dump.
"""

from __future__ import annotations

import secrets
from functools import cached_property
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.engine.grammar import GrammarError, json_schema_grammar, regex_grammar
from serve.engine.types import FinishReason, SamplingParams, TokenEvent
from serve.errors import ValidationFailed
from serve.http.schemas.common import MAX_CHOICES, MAX_TOP_LOGPROBS, LenientModel, absent_when_none, check_stop
from serve.http.schemas.openai import CacheSalt


class Grammar(LenientModel):
    """TGI's constrained-output parameter: a JSON schema or a regular expression."""

    type: Literal["json", "json_object", "json_schema", "regex"]
    value: Union[dict[str, Any], str, bool]

    def text(self) -> str:
        """The llguidance grammar (422 naming ``parameters.grammar`` when the schema or regex is malformed)."""
        try:
            if self.type == "regex":
                if not isinstance(self.value, str):
                    raise GrammarError("a regex grammar takes the pattern as a string")
                return regex_grammar(self.value)
            value = (
                self.value.get("schema", self.value)
                if self.type == "json_schema" and isinstance(self.value, dict)
                else self.value
            )
            return json_schema_grammar(value)
        except GrammarError as exc:
            raise ValidationFailed(f"parameters.grammar: {exc}", "parameters.grammar") from None


class GenerateParameters(LenientModel):
    adapter_id: Optional[str] = None  # a loaded LoRA adapter's name (TGI's field)
    cache_salt: Optional[CacheSalt] = None  # an extension (vLLM's name): shares the prefix cache only within it
    max_new_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, gt=0.0, le=100.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, gt=0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0, le=10.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(default=None, ge=0, le=2**64 - 1)  # the range torch generators accept
    stop: list[str] = Field(default_factory=list)
    do_sample: bool = False
    return_full_text: bool = False
    details: bool = False
    truncate: Optional[int] = Field(default=None, ge=1)
    ignore_eos: bool = False
    typical_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_n_tokens: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    decoder_input_details: bool = False
    best_of: Optional[int] = Field(default=None, ge=1, le=MAX_CHOICES)
    grammar: Optional[Grammar] = None
    watermark: bool = False  # TGI's green-list watermark (serve/engine/watermark.py)

    @model_validator(mode="after")
    def _best_of_samples(self) -> "GenerateParameters":
        if (self.best_of or 1) > 1 and not self.samples:
            raise ValueError("best_of > 1 needs sampling: set do_sample: true (or a temperature, top_k or top_p)")
        return self

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: list[str]) -> list[str]:
        check_stop(value)
        return value

    @property
    def samples(self) -> bool:
        """TGI samples when asked to, or when any sampling knob is set; otherwise greedy."""
        return self.do_sample or any(v is not None for v in (self.temperature, self.top_p, self.top_k, self.typical_p))


class GenerateRequest(LenientModel):
    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False

    @model_validator(mode="after")
    def _best_of_not_streamed(self) -> "GenerateRequest":
        if self.stream and (self.parameters.best_of or 1) > 1:
            raise ValueError("parameters.best_of > 1 cannot be streamed; send stream: false")
        return self

    @property
    def requested_max_tokens(self) -> Optional[int]:
        """``parameters.max_new_tokens``; None when not set (serve.front.budget applies TGI's default)."""
        return self.parameters.max_new_tokens

    @property
    def best_of(self) -> int:
        return self.parameters.best_of or 1

    @cached_property
    def seed(self) -> Optional[int]:
        """The client's seed; a random one for a sampled request that asks for details, which report the seed
        that was used (as TGI does), so that the answer can be reproduced."""
        p = self.parameters
        return secrets.randbits(63) if p.seed is None and p.samples and p.details else p.seed

    @property
    def prefix_cache_salt(self) -> Optional[str]:
        return self.parameters.cache_salt

    def to_sampling_params(self, max_new_tokens: int, grammar: Optional[str] = None) -> SamplingParams:
        p = self.parameters
        wants_logprobs = p.details or self.stream or self.best_of > 1 or bool(p.top_n_tokens)
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=(p.temperature or 1.0) if p.samples else 0.0,
            top_p=p.top_p or 1.0,
            top_k=p.top_k or 0,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            seed=self.seed,
            stop=tuple(s for s in p.stop if s),
            ignore_eos=p.ignore_eos,
            typical_p=p.typical_p or 1.0,
            logprobs=(p.top_n_tokens or 0) if wants_logprobs else None,
            prompt_logprobs=p.decoder_input_details,
            grammar=grammar,
        )


class TokenizeRequest(LenientModel):
    inputs: str


TGIFinishReason = Literal["length", "eos_token", "stop_sequence"]


class Token(BaseModel):
    id: int
    text: str
    logprob: Optional[float]
    special: Optional[bool] = absent_when_none("Whether it is a special token (not given for prompt tokens)")


class StreamDetails(BaseModel):
    finish_reason: TGIFinishReason
    generated_tokens: int
    seed: Optional[int]
    input_length: int


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: TGIFinishReason
    generated_tokens: int
    seed: Optional[int]
    input_length: int
    prefill: list[Token]
    tokens: list[Token]
    top_tokens: Optional[list[list[Token]]] = absent_when_none()


class Details(StreamDetails):
    """``details: true``: the generated tokens (and prompt tokens with ``decoder_input_details``)."""

    prefill: list[Token]
    tokens: list[Token]
    top_tokens: Optional[list[list[Token]]] = absent_when_none("With top_n_tokens: each token's likeliest")
    best_of_sequences: Optional[list[BestOfSequence]] = absent_when_none("With best_of > 1: the other choices")


class GenerateResponse(BaseModel):
    generated_text: str
    details: Optional[Details] = absent_when_none()


class StreamResponse(BaseModel):
    """One /generate_stream event; the last one carries the whole generated_text (and details, when asked)."""

    index: int
    token: Token
    generated_text: Optional[str]
    details: Optional[StreamDetails]
    top_tokens: Optional[list[Token]] = absent_when_none()


class TokenSpan(BaseModel):
    id: int
    text: str
    start: int
    stop: int


class Info(BaseModel):
    """/info: the model and the server's limits (more fields once the model is loaded)."""

    model_config = ConfigDict(extra="allow")

    model_id: Optional[str] = None
    max_concurrent_requests: int
    version: str


def tgi_finish_reason(reason: FinishReason, stop_sequence: Optional[str]) -> str:
    if reason is FinishReason.LENGTH:
        return "length"
    return "stop_sequence" if stop_sequence else "eos_token"


def token(token_id: int, text: str, logprob: Optional[float], special: Optional[bool] = None) -> dict[str, Any]:
    """One Token (prefill tokens carry no ``special``)."""
    body: dict[str, Any] = {"id": token_id, "text": text, "logprob": logprob}
    if special is not None:
        body["special"] = special
    return body


def details(
    final: TokenEvent,
    seed: Optional[int],
    tokens: list[dict[str, Any]],
    prefill: list[dict[str, Any]],
    top_tokens: Optional[list],
) -> dict[str, Any]:
    """The Details of a TGI response."""
    body: dict[str, Any] = {**stream_details(final, seed), "prefill": prefill, "tokens": tokens}
    if top_tokens is not None:
        body["top_tokens"] = top_tokens
    return body


def stream_details(final: TokenEvent, seed: Optional[int]) -> dict[str, Any]:
    """The StreamDetails of the last ``/generate_stream`` event."""
    return StreamDetails(
        finish_reason=tgi_finish_reason(final.finish_reason, final.stop_sequence),
        generated_tokens=final.generated_tokens,
        seed=seed,
        input_length=final.prompt_tokens,
    ).model_dump()


def stream_token(index: int, token_body: dict[str, Any], top_tokens: Optional[list]) -> dict[str, Any]:
    """One StreamResponse: a ``/generate_stream`` event for a generated token."""
    body: dict[str, Any] = {"index": index, "token": token_body, "generated_text": None, "details": None}
    if top_tokens is not None:
        body["top_tokens"] = top_tokens
    return body
