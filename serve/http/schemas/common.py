"""Pieces shared by the request and response models of every API style."""

from __future__ import annotations

import functools
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_CHOICES = 16  # n and best_of
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # logit_bias entries per request
MAX_PROMPTS = 64  # prompts of one /v1/completions request (each with its n choices)


class LenientModel(BaseModel):
    """Unknown fields are ignored, as OpenAI clients send extras; known ones are strictly typed."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """An explicit ``null`` for an optional field means "not set" (OpenAI marks them nullable; SDKs send nulls)."""
        if not isinstance(data, dict):
            return data
        optional = _optional_keys(cls)
        return {key: value for key, value in data.items() if value is not None or key not in optional}


@functools.cache
def _optional_keys(model: type[BaseModel]) -> frozenset[str]:
    """The names and aliases of a model's fields that have a default."""
    fields = model.model_fields.items()
    return frozenset(key for name, f in fields if not f.is_required() for key in (name, f.alias) if key)


def _is_none(value: Any) -> bool:
    return value is None


def _never_null(schema: dict[str, Any]) -> None:
    """The documented schema of an ``absent_when_none`` field: its type without the null that is never sent."""
    kinds = [kind for kind in schema.pop("anyOf", []) if kind != {"type": "null"}]
    schema.pop("default", None)
    if len(kinds) == 1:
        schema.update(kinds[0])
    elif kinds:
        schema["anyOf"] = kinds


def absent_when_none(description: Optional[str] = None) -> Any:
    """A response field left out of the body, rather than sent as null, when it has no value."""
    return Field(default=None, exclude_if=_is_none, description=description, json_schema_extra=_never_null)


def normalize_stop(stop: Union[str, list[str], None]) -> tuple[str, ...]:
    """A stop field (one string or a list) as a tuple of non-empty strings."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    return tuple(item for item in items if item)


StopField = Field(default=None, description="Up to 16 strings; generation stops before the first one produced.")


def check_stop(value: Union[str, list[str], None]) -> Union[str, list[str], None]:
    """Bound the number and size of stop strings (each is matched on every generated token)."""
    items = [value] if isinstance(value, str) else (value or [])
    if len(items) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(items)}")
    if any(len(item) > MAX_STOP_LENGTH for item in items):
        raise ValueError(f"each stop sequence must be at most {MAX_STOP_LENGTH} characters")
    return value


class SamplingFields(LenientModel):
    """OpenAI sampling fields shared by chat and text completions (vLLM extensions included)."""

    model: str = "tgi"
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    typical_p: float = Field(default=1.0, gt=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0, le=10.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(default=None, ge=-(2**63), le=2**64 - 1)  # the range torch generators accept
    stop: Union[str, list[str], None] = StopField
    stream: bool = False
    n: int = Field(default=1, ge=1, le=MAX_CHOICES, description="How many choices to generate for the prompt.")
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: Union[str, list[str], None]) -> Union[str, list[str], None]:
        return check_stop(value)
