"""Custom handler code, as the SageMaker inference toolkit has it: ``/opt/ml/model/code/inference.py``.

It may define ``input_fn(request_body, content_type) -> dict`` (turn any body into a payload our /invocations
understands: ``{"inputs": ...}``, ``{"messages": ...}`` or ``{"prompt": ...}``) and
``output_fn(prediction, accept) -> (body, content_type)`` (render our JSON answer, as a dict or list, however it
likes). ``code/requirements.txt`` is pip-installed into the server's interpreter before gunicorn starts its workers.
The model itself is ours: ``model_fn``/``predict_fn``/``transform_fn`` are not called (a warning says so).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from flask import Request, Response

from serve.errors import BadRequest, ServeError

log = logging.getLogger(__name__)

ENTRY_POINT = "inference.py"
IGNORED_HOOKS = ("model_fn", "predict_fn", "transform_fn")


class HandlerError(RuntimeError):
    """The custom code or its requirements cannot be loaded; the message names the file and the cause."""


def code_dir(model_dir: str) -> Path:
    return Path(model_dir) / "code"


def install_requirements(folder: Path, say: Callable[[str], None] = log.info, python: str = sys.executable) -> bool:
    """``pip install -r code/requirements.txt`` into ``python``'s environment; False when there is none."""
    requirements = folder / "requirements.txt"
    if not requirements.is_file():
        return False
    say(f"installing custom handler requirements: {python} -m pip install -r {requirements}")
    started = time.monotonic()
    command = [python, "-m", "pip", "install", "--no-input", "--disable-pip-version-check", "-r", str(requirements)]
    result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()[-15:]
        raise HandlerError(f"pip install -r {requirements} failed (exit {result.returncode}):\n" + "\n".join(output))
    say(f"custom handler requirements installed in {time.monotonic() - started:.1f} s")
    return True


class CustomHandler:
    """The ``input_fn``/``output_fn`` of one inference.py; either may be missing (then ours is used)."""

    def __init__(self, path: Path, module: Any):
        self.path = path
        self.input_fn: Optional[Callable[[Any, str], Any]] = getattr(module, "input_fn", None)
        self.output_fn: Optional[Callable[[Any, str], Any]] = getattr(module, "output_fn", None)

    @classmethod
    def load(cls, model_dir: str) -> Optional["CustomHandler"]:
        """Import ``<model_dir>/code/inference.py`` (its folder first on sys.path); None when there is none."""
        path = code_dir(model_dir) / ENTRY_POINT
        if not path.is_file():
            return None
        sys.path.insert(0, str(path.parent))
        spec = importlib.util.spec_from_file_location("inference", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise HandlerError(f"could not import the custom handler {path}: {type(exc).__name__}: {exc}") from exc
        handler = cls(path, module)
        ignored = [name for name in IGNORED_HOOKS if hasattr(module, name)]
        if ignored:
            log.warning(
                "%s defines %s; this server runs its own model and calls only input_fn/output_fn",
                path,
                ", ".join(ignored),
            )
        log.info(
            "custom handler %s: input_fn=%s output_fn=%s",
            path,
            handler.input_fn is not None,
            handler.output_fn is not None,
        )
        return handler

    def payload(self, request: Request, default: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The /invocations payload: ``input_fn(body, content_type)``, or our JSON parsing without one."""
        if self.input_fn is None:
            return default()
        from serve.http.routes.common import request_body  # the body with its size limit enforced (413), chunked too

        body = request_body()
        try:
            payload = self.input_fn(body, request.content_type or "application/json")
        except Exception as exc:  # the handler judges the body; its errors are the client's 400
            raise BadRequest(f"input_fn in {self.path.name} rejected the request: {type(exc).__name__}: {exc}") from exc
        if not isinstance(payload, dict):
            raise ServeError(
                f"input_fn in {self.path.name} returned {type(payload).__name__}; it must return a dict payload"
            )
        return payload

    def render(self, response: Response, accept: str) -> Response:
        """``output_fn(prediction, accept)`` over our JSON answer; streams and errors pass through unchanged."""
        if self.output_fn is None or response.is_streamed or response.status_code != 200 or not response.is_json:
            return response
        try:
            body, content_type = self.output_fn(response.get_json(), accept)
        except Exception as exc:
            raise ServeError(f"output_fn in {self.path.name} failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(body, (str, bytes)):
            body = json.dumps(body)
        rendered = Response(body, status=200, content_type=content_type)
        for name in ("x-compute-time", "x-queue-time", "x-prompt-tokens", "x-generated-tokens", "x-time-per-token"):
            if name in response.headers:
                rendered.headers[name] = response.headers[name]
        return rendered
