"""The Flask application factory: settings + engine in, routes and error handlers registered."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable, Optional

from flask import Flask, Response, current_app, g, jsonify, request
from werkzeug.exceptions import HTTPException

from serve.sagemaker.adapters import AdapterRegistry
from serve.sagemaker.emf import reporter_for
from serve.config import Settings, load_settings
from serve.front.disconnect import ClientConnection, DisconnectWatcher
from serve.engine.interface import EngineClient
from serve.errors import BadRequest, MethodNotAllowed, NotFound, NotReady, PayloadTooLarge, ServeError, error_body
from serve.front.generation import GenerationService
from serve.sagemaker.custom_handler import CustomHandler
from serve.metrics import Metrics
from serve.http.routes import docs, openai, responses, tgi
from serve.http.routes.common import ADMITTED, CLIENT
from serve.http.routes.validation import Validator
from serve.http.routes.adapter_choice import requested_adapter
from serve.sagemaker import adapter_routes, invocations
from serve.sagemaker.sessions import SessionStore
from serve.http.security import check_api_key, redact_logs, scrub, secret_values
from serve.http.shutdown import Drain
from serve.wiring import build_engine

log = logging.getLogger(__name__)

WORKER_BOOT_ERROR = 3  # gunicorn halts the whole server when a worker exits with this code
HTTP_ERRORS = {400: BadRequest, 404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge}


def create_app(
    settings: Optional[Settings] = None, engine: Optional[EngineClient] = None, exit_on_load_failure: bool = False
) -> Flask:
    """Build the app; the engine starts loading the model in the background (``/ping`` is 503 until it is done)."""
    settings = settings or load_settings()
    if engine is None:
        on_failure = _exit_worker if exit_on_load_failure else None
        engine = build_engine(settings, on_failure, lambda: _log_cold_start(settings))
    app = Flask("serve", static_folder=None)  # no route serves files from disk
    app.config["MAX_CONTENT_LENGTH"] = settings.max_payload_bytes
    app.json.sort_keys = False
    app.extensions["serve.settings"] = settings
    app.extensions["serve.sagemaker.custom_handler"] = CustomHandler.load(settings.model_dir)
    metrics = Metrics(engine, settings.metrics_dir)
    watcher = DisconnectWatcher(engine.cancel)
    service = GenerationService(engine, settings, metrics, watcher)
    app.extensions["serve.service"] = service
    app.extensions["serve.validator"] = Validator(service, requested_adapter)
    app.extensions["serve.drain"] = Drain(
        lambda: engine.in_flight, settings.graceful_timeout, cut=service.interrupt_all
    )
    app.extensions["serve.secrets"] = secret_values(settings)
    redact_logs(app.extensions["serve.secrets"])
    _add_sagemaker_native(app, settings, engine)
    for module in (invocations, openai, responses, tgi, docs, adapter_routes):
        app.register_blueprint(module.blueprint)
    _register_error_handlers(app)
    app.before_request(_stamp_arrival)
    app.before_request(_guard)
    app.after_request(_unwatch_when_sent(watcher))
    app.after_request(_release_generations)
    app.after_request(lambda response: _count(metrics, response))
    engine.start()
    return app


def _add_sagemaker_native(app: Flask, settings: Settings, engine: EngineClient) -> None:
    """Runtime adapters, stateful sessions (when enabled) and CloudWatch EMF metrics (when enabled)."""
    app.extensions["serve.adapters"] = AdapterRegistry(engine, settings)
    if settings.stateful_sessions:
        app.extensions["serve.sagemaker.sessions"] = SessionStore(
            settings.sessions_expiration, engine.close_session, max_sessions=settings.max_sessions
        ).start()
    app.extensions["serve.sagemaker.emf"] = reporter_for(settings, engine, app.extensions["serve.service"].metrics)


def _stamp_arrival() -> None:
    """When the request arrived, for the invocation deadline (before any other hook spends time)."""
    request.environ["serve.arrival"] = time.monotonic()


def _log_cold_start(settings: Settings) -> None:
    if settings.started_at is not None:
        log.info("cold start: ready %.1f s after `serve` started", time.time() - settings.started_at)


def _exit_worker(exc: BaseException) -> None:
    """A model that cannot load never will: stop the worker so gunicorn (and the container) exit with the reason
    logged."""
    log.critical("cannot serve: %s", exc)
    sys.stderr.flush()
    os._exit(WORKER_BOOT_ERROR)


def _unwatch_when_sent(watcher: DisconnectWatcher) -> Callable[[Response], Response]:
    """An after_request handler: once the response is sent (a stream to its end) or abandoned, stop watching its
    client's socket.

    Not a teardown handler: for a streamed response Flask tears the request down as soon as the view returns.
    """

    def after(response: Response) -> Response:
        client: Optional[ClientConnection] = g.get(CLIENT)
        request_ids = client.response_begins() if client is not None else []
        if request_ids:
            response.call_on_close(lambda: [watcher.unwatch(request_id) for request_id in request_ids])
        return response

    return after


def _release_generations(response: Response) -> Response:
    """Once the response is closed (sent, streamed to its end, or failed), cancel whatever its request admitted."""
    generations = g.pop(ADMITTED, [])
    if generations:
        service: GenerationService = current_app.extensions["serve.service"]
        response.call_on_close(lambda: [service.release(generation) for generation in generations])
    return response


def _count(metrics: Metrics, response: Response) -> Response:
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.requests.labels(route, str(response.status_code)).inc()
    return response


def _guard() -> Optional[tuple[Response, int]]:
    """Before every route: the API key (when API_KEY is set), then 503 while the worker drains for shutdown."""
    settings: Settings = current_app.extensions["serve.settings"]
    check_api_key(settings.api_key, request.path, request.headers.get("Authorization"))
    if not current_app.extensions["serve.drain"].draining:
        return None
    if request.path == "/ping":
        return jsonify({"status": "draining"}), 503
    if request.method == "POST" or request.path == "/health":
        raise NotReady("the server is shutting down; send the request to another instance")
    return None


def _render(error: ServeError) -> tuple[Response, int]:
    """The error in the style of the request's path (serve.errors.error_style); configured secrets never appear."""
    error.message = scrub(error.message, current_app.extensions.get("serve.secrets", ()))
    body, status = error_body(error, request.path)
    response = jsonify(body)
    if error.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response, status


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ServeError)
    def serve_error(error: ServeError):
        return _render(error)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        kind = HTTP_ERRORS.get(error.code or 500, ServeError)
        message = f"{request.method} {request.path}: {error.description}"
        if error.code == 413:
            message = f"the request body is larger than the {app.config['MAX_CONTENT_LENGTH']} byte limit"
        rendered = kind(message)
        rendered.status = error.code or 500
        return _render(rendered)

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _render(ServeError("internal error; see the server log"))
