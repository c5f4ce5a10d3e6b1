"""One exception hierarchy for every client-visible failure, rendered per API style, and which style a path gets."""

from __future__ import annotations

import enum
from typing import Any, Optional, Union

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


class ServeError(Exception):
    """Base of every error a client may see: an HTTP status, an error type and a clear message."""

    status = 500
    error_type = "internal_error"

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def openai_status(self) -> int:
        """The status on /v1/*: OpenAI answers every invalid request with 400 (we use 422 on TGI's routes)."""
        return 400 if self.status == 422 else self.status

    def openai_body(self) -> dict[str, Any]:
        """The OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``."""
        invalid = self.openai_status == 400
        detail = OpenAIErrorDetail(
            message=self.message,
            type="invalid_request_error" if invalid else self.error_type,
            param=self.param,
            code="invalid_value" if self.status == 422 else self.status,
        )
        return OpenAIError(error=detail).model_dump()

    def tgi_body(self) -> dict[str, Any]:
        """The TGI-style body: ``{"error": "...", "error_type": "..."}``."""
        return TGIError(error=self.message, error_type=self.error_type).model_dump()


class BadRequest(ServeError):
    """The body is not JSON, or not the JSON object we expect."""

    status = 400
    error_type = "invalid_request_error"


class ValidationFailed(ServeError):
    """A field is missing, of the wrong type or out of range."""

    status = 422
    error_type = "validation"


class NotFound(ServeError):
    status = 404
    error_type = "not_found"


class MethodNotAllowed(ServeError):
    status = 405
    error_type = "method_not_allowed"


class PayloadTooLarge(ServeError):
    status = 413
    error_type = "payload_too_large"


class GenerationFailed(ServeError):
    """The model failed while generating (SageMaker's 424 for a failed invocation)."""

    status = 424
    error_type = "generation"


class ShuttingDown(GenerationFailed):
    """The drain deadline of a shutdown cut the generation (503; in-band on a stream that had begun)."""

    status = 503
    error_type = "unhealthy"


class Overloaded(ServeError):
    """More requests than MAX_CONCURRENT_REQUESTS are in flight."""

    status = 429
    error_type = "overloaded"


class NotReady(ServeError):
    """The model is still loading (or the server is shutting down)."""

    status = 503
    error_type = "unhealthy"


class Unauthorized(ServeError):
    """API_KEY is set and the request did not present it as ``Authorization: Bearer <key>``."""

    status = 401
    error_type = "authentication_error"


class ErrorStyle(str, enum.Enum):
    """How an error is written: OpenAI's ``{"error": {...}}`` (invalid requests as 400) or TGI's flat body."""

    OPENAI = "openai"
    TGI = "tgi"


def error_style(path: str, stream: Optional[ErrorStyle] = None) -> ErrorStyle:
    """The style of an error on ``path``: OpenAI's on /v1/*, TGI's everywhere else (SageMaker's TGI container).

    ``stream``: the style of the stream the error interrupts, for an in-band ``error`` event. A stream's events
    keep its API's style whatever the path (a chat stream on /invocations fails OpenAI-style).
    """
    if stream is not None:
        return stream
    return ErrorStyle.OPENAI if path.startswith("/v1/") else ErrorStyle.TGI


def error_body(error: ServeError, path: str, stream: Optional[ErrorStyle] = None) -> tuple[dict[str, Any], int]:
    """The body and HTTP status of ``error`` on ``path``, in the style :func:`error_style` picks."""
    return styled_body(error, error_style(path, stream))


def styled_body(error: ServeError, style: ErrorStyle) -> tuple[dict[str, Any], int]:
    """The body and HTTP status of ``error`` in ``style``."""
    if style is ErrorStyle.OPENAI:
        return error.openai_body(), error.openai_status
    return error.tgi_body(), error.status
