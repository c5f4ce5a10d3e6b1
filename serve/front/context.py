"""What the route knows about one request, handed to the layers below it instead of Flask's globals."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Optional

from serve.front.disconnect import ClientConnection
from serve.errors import ErrorStyle


class Api(str, enum.Enum):
    """The API a request body speaks (on its own route or on /invocations)."""

    TGI = "tgi"
    CHAT = "chat"
    COMPLETION = "completion"

    @property
    def error_style(self) -> ErrorStyle:
        """How a failure inside this API's stream is written (a chat stream on /invocations fails OpenAI-style)."""
        return ErrorStyle.TGI if self is Api.TGI else ErrorStyle.OPENAI


@dataclass(frozen=True)
class RequestContext:
    """One client request as the route saw it.

    ``route`` is the path it came in on; ``api`` and ``streamed`` are known once its body is validated;
    ``session_id`` is a live SageMaker session (the engine keeps its prefix pinned); ``deadline`` is a
    ``time.monotonic()`` value by which a non-streamed answer is cut short; ``client`` is the connection the
    disconnect watcher peeks at (its socket is None outside gunicorn).
    """

    route: str
    client: ClientConnection
    api: Api = Api.TGI
    streamed: bool = False
    session_id: Optional[str] = None
    deadline: Optional[float] = None

    def speaking(self, api: Api, streamed: bool) -> "RequestContext":
        """This context once the body is known: its API and whether its answer is streamed."""
        return replace(self, api=api, streamed=streamed)
