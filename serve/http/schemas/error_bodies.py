"""The error bodies of both API styles (serve.http.errors picks the style for a path and fills them in)."""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str]
    code: Union[int, str]


class OpenAIError(BaseModel):
    """OpenAI's error body (on /v1/*, and in-band in an OpenAI-style stream)."""

    error: OpenAIErrorDetail


class TGIError(BaseModel):
    """TGI's error body (everywhere else)."""

    error: str
    error_type: str
