"""SageMaker's own bodies: the /ping answer and the register-adapter request."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class Status(BaseModel):
    """/ping: healthy (200), or loading, restarting, stalled, failed or draining (503)."""

    status: Literal["healthy", "loading", "restarting", "stalled", "failed", "draining"]


class RegisterAdapter(BaseModel):
    """SageMaker's register-adapter request (the same fields may come as query parameters)."""

    name: str
    src: str = Field(description="A peft folder, a .tar.gz of one, or a folder holding one .tar.gz")
    preload: bool = True
    pin: bool = False
