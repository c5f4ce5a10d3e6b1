"""What every route uses from Flask: the app's services, the JSON body, and the request's context for the layers
below (which never read Flask's globals themselves)."""

from __future__ import annotations

import json
import socket
import sys
from typing import Any, Iterator, Optional

from flask import current_app, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from serve.config import Settings
from serve.engine import TokenEvent
from serve.front.context import RequestContext
from serve.front.generation import Generation, GenerationService, ValidRequest
from serve.front.disconnect import ClientConnection
from serve.errors import BadRequest, ServeError
from serve.http.routes.sse import KEEPALIVE_SECONDS
from serve.http.routes.validation import Validator

CLIENT, ADMITTED = "serve_client", "serve_generations"  # per-request keys in flask.g, read by the app's hooks


class UnsupportedMediaType(ServeError):
    """A body sent as something other than JSON to an API route (TGI answers 415 with these words)."""

    status = 415
    error_type = "unsupported_media_type"

    def __init__(self) -> None:
        super().__init__("Expected request with `Content-Type: application/json`")


def service() -> GenerationService:
    return current_app.extensions["serve.service"]


def settings() -> Settings:
    return current_app.extensions["serve.settings"]


def validator() -> Validator:
    return current_app.extensions["serve.validator"]


def request_context(session_id: Optional[str] = None, deadline: Optional[float] = None) -> RequestContext:
    """The context of the request being served (its API and streaming are set once its body is validated)."""
    return RequestContext(route=request.path, client=client_connection(), session_id=session_id, deadline=deadline)


def client_connection() -> ClientConnection:
    """This request's client connection (gunicorn passes its socket), made once per request."""
    if CLIENT not in g:
        sock = request.environ.get("gunicorn.socket")
        http11 = request.environ.get("SERVER_PROTOCOL") == "HTTP/1.1"
        setattr(g, CLIENT, ClientConnection(sock if isinstance(sock, socket.socket) else None, http11))
    return g.get(CLIENT)


def admit(valid: ValidRequest, context: RequestContext) -> Generation:
    """Start ``valid``'s generation; it is released when the response closes, however the request ends."""
    generation = service().start(valid, context)
    g.setdefault(ADMITTED, []).append(generation)
    return generation


def admitted() -> list[Generation]:
    """The generations this request has started so far."""
    return list(g.get(ADMITTED, []))


def api_json_body() -> dict[str, Any]:
    """The body of a TGI or OpenAI route: a JSON object, sent as JSON (415 for another declared content type, as
    TGI; a body without a ``Content-Type`` is read as JSON)."""
    if request.mimetype and not request.is_json:
        raise UnsupportedMediaType()
    return json_body()


def json_body() -> dict[str, Any]:
    """The request body as a JSON object (any content type is accepted, as SageMaker clients vary)."""
    raw = request_body()
    if not raw.strip():
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        payload = json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest("the request body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(
            f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    except ValueError:  # Python refuses integers of more than sys.get_int_max_str_digits() digits
        raise BadRequest(
            f"the request body is not valid JSON: a number has more than {sys.get_int_max_str_digits()} digits"
        ) from None
    if not isinstance(payload, dict):
        raise BadRequest(f"the request body must be a JSON object, not {type(payload).__name__}")
    return payload


def request_body() -> bytes:
    """The raw body; 413 past MAX_CONTENT_LENGTH, with a ``Content-Length`` or chunked.

    Werkzeug stops a chunked body quietly at the limit; one byte more on the server's own stream tells a body that
    ends there from one that goes on (which is refused, never served cut).
    """
    raw = request.get_data(cache=True)  # raises 413 when Content-Length is past the limit
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if limit is not None and request.content_length is None and len(raw) >= limit:
        if request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    return raw


def token_texts(token_ids: list[int]) -> list[str]:
    """Each token's own text, as clients expect in log-probability listings."""
    if not token_ids:
        return []  # batch_decode([]) answers [""]
    return service().tokenizer.batch_decode([[token_id] for token_id in token_ids])


def stream_events(generation: Generation) -> Iterator[Optional[tuple[int, TokenEvent]]]:
    """A streamed generation's (index, event) pairs, None after each ``sse.KEEPALIVE_SECONDS`` of silence."""
    return service().stream_events(generation, heartbeat=KEEPALIVE_SECONDS)
