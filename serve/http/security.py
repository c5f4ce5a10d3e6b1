"""Optional API-key authentication, and keeping secrets (HF_TOKEN, API_KEY) out of logs and error bodies."""

from __future__ import annotations

import hmac
import logging
import re
from typing import Iterable, Optional

from serve.config import Settings
from serve.errors import Unauthorized

# SageMaker authenticates these with IAM (and its health checks send no credentials); the API docs are public.
OPEN_PATHS = frozenset({"/ping", "/invocations", "/openapi.json", "/docs"})
REDACTED = "[redacted]"


def check_api_key(api_key: Optional[str], path: str, authorization: Optional[str]) -> None:
    """Raise Unauthorized unless ``path`` is open, no key is configured, or the Bearer token matches it."""
    if not api_key or path in OPEN_PATHS:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("this server requires an API key: send the header 'Authorization: Bearer <API_KEY>'")
    if not hmac.compare_digest(token.strip().encode("utf-8"), api_key.encode("utf-8")):
        raise Unauthorized("the API key in the Authorization header is not valid")


SHORT_SECRET = 6  # shorter secrets are redacted only where they stand alone, so ordinary words survive


def secret_values(settings: Settings) -> tuple[str, ...]:
    """The configured secrets to scrub from logs and error bodies, however short."""
    return tuple(value for value in (settings.hf_token, settings.api_key) if value)


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced by a marker (a short one where it is not part of a longer word)."""
    for secret in secrets:
        if secret not in text:
            continue
        if len(secret) >= SHORT_SECRET:
            text = text.replace(secret, REDACTED)
        else:
            text = re.sub(rf"(?<![\w-]){re.escape(secret)}(?![\w-])", REDACTED, text)
    return text


class RedactSecrets(logging.Filter):
    """A handler filter that rewrites any record whose message holds a secret (the record is never dropped)."""

    def __init__(self, secrets: tuple[str, ...]):
        super().__init__("serve.http.security")
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = scrub(message, self.secrets)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        exc_text = scrub(record.exc_text, self.secrets) if record.exc_text else record.exc_text
        if cleaned != message or exc_text != record.exc_text:
            record.msg, record.args, record.exc_text = cleaned, None, exc_text
        return True


def redact_logs(secrets: tuple[str, ...], logger_names: Iterable[str] = ("", "gunicorn.error")) -> None:
    """Install the redacting filter on every handler of the named loggers (root and gunicorn's by default)."""
    if not secrets:
        return
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(RedactSecrets(secrets))
