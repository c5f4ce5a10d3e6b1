"""TGI ``/generate`` requests (``{"inputs": ..., "parameters": {...}}``) and the bodies TGI clients expect."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, field_validator

from serve.engine.types import FinishReason, SamplingParams, TokenEvent
from serve.schemas.common import LenientModel, check_stop

TGI_DEFAULT_MAX_NEW_TOKENS = 100


class GenerateParameters(LenientModel):
    max_new_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, gt=0.0, le=100.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, gt=0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0, le=10.0)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(default=None, ge=0)
    stop: list[str] = Field(default_factory=list)
    do_sample: bool = False
    return_full_text: bool = False
    details: bool = False
    truncate: Optional[int] = Field(default=None, ge=1)
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: list[str]) -> list[str]:
        check_stop(value)
        return value

    @property
    def samples(self) -> bool:
        """TGI samples when asked to, or when any sampling knob is set; otherwise greedy."""
        return self.do_sample or any(v is not None for v in (self.temperature, self.top_p, self.top_k))


class GenerateRequest(LenientModel):
    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False

    @property
    def requested_max_tokens(self) -> int:
        return self.parameters.max_new_tokens or TGI_DEFAULT_MAX_NEW_TOKENS

    def to_sampling_params(self, max_new_tokens: int) -> SamplingParams:
        p = self.parameters
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=(p.temperature or 1.0) if p.samples else 0.0,
            top_p=p.top_p or 1.0,
            top_k=p.top_k or 0,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            seed=p.seed,
            stop=tuple(s for s in p.stop if s),
            ignore_eos=p.ignore_eos,
        )


class TokenizeRequest(LenientModel):
    inputs: str


def tgi_finish_reason(reason: FinishReason, stop_sequence: Optional[str]) -> str:
    if reason is FinishReason.LENGTH:
        return "length"
    return "stop_sequence" if stop_sequence else "eos_token"


def details(final: TokenEvent, seed: Optional[int]) -> dict[str, Any]:
    """The ``details`` object of a TGI response."""
    return {
        "finish_reason": tgi_finish_reason(final.finish_reason, final.stop_sequence),
        "generated_tokens": final.generated_tokens,
        "seed": seed,
        "prefill": [],
        "tokens": [],
    }


def stream_token(index: int, event: TokenEvent, special: bool) -> dict[str, Any]:
    """One ``/generate_stream`` event for a generated token."""
    return {
        "index": index,
        "token": {"id": event.token_id, "text": event.text, "logprob": None, "special": special},
        "generated_text": None,
        "details": None,
    }
