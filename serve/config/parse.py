"""How each setting's text is read: booleans, counts, seconds, choices, adapter lists, templates; a malformed value
raises SettingsError naming its variable. Pure functions of (variable name, raw text): serve/config reads the
environment and hands each value here."""

from __future__ import annotations

import os
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


TRUE_WORDS = {"1", "true", "yes", "on"}


FALSE_WORDS = {"0", "false", "no", "off", ""}


DTYPES = ("auto", "float32", "bfloat16", "float16")


class SettingsError(ValueError):
    """A malformed environment variable; the message names the variable."""


def parse_bool(name: str, raw: str) -> bool:
    """Parse a boolean the way users write them: true/True/1/yes and false/0/no."""
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use true/false, 1/0, yes/no)")


def parse_positive_int(name: str, raw: str) -> int:
    """Parse a strictly positive integer (JSON-encoded numbers such as "1" included)."""
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value <= 0:
        raise SettingsError(f"{name}={raw!r} must be greater than 0")
    return value


def parse_gpu_count(name: str, raw: str) -> int:
    """A GPU count: a non-negative integer, 0 meaning the CPU."""
    if raw.strip() == "0":
        return 0
    return parse_positive_int(name, raw)


def parse_timestamp(name: str, raw: str) -> float:
    """A Unix timestamp in seconds."""
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a Unix timestamp") from None


def parse_dtype(name: str, raw: str) -> str:
    """Accept one of the supported dtype names."""
    value = raw.strip().lower()
    if value not in DTYPES:
        raise SettingsError(f"{name}={raw!r} is not one of {', '.join(DTYPES)}")
    return value


def parse_choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    """A parser accepting one of ``choices`` (case-insensitive)."""

    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise SettingsError(f"{name}={raw!r} is not one of {', '.join(choices)}")
        return value

    return parse


def parse_speculative(
    methods: tuple[str, ...], with_model: tuple[str, ...]
) -> Callable[[str, str], tuple[str, Optional[str]]]:
    """A parser of ``method`` (one of ``methods``, case-insensitive) or ``method:<model id or path>`` for the
    methods of ``with_model``, which need one: (method, the model's id or path, else None)."""
    named = [f"{method}:<model id or path>" if method in with_model else method for method in methods]

    def parse(name: str, raw: str) -> tuple[str, Optional[str]]:
        method, colon, model = raw.strip().partition(":")
        method, model = method.strip().lower(), model.strip()
        if method not in methods:
            raise SettingsError(f"{name}={raw!r} is not one of {', '.join(named)}")
        if method in with_model and not model:
            raise SettingsError(f"{name}={raw!r} names no model: write {method}:<model id or path>")
        if method not in with_model and colon:
            raise SettingsError(f"{name}={raw!r}: {method} takes no model (write {method})")
        return method, model or None

    return parse


def parse_adapters(name: str, raw: str) -> tuple[tuple[str, str], ...]:
    """``name=path,name=path`` -> ((name, path), ...); names must be unique and non-empty."""
    pairs: list[tuple[str, str]] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        adapter, sep, path = (piece.strip() for piece in item.partition("="))
        if not sep or not adapter or not path:
            raise SettingsError(f"{name}: {item!r} is not of the form adapter_name=path")
        if any(adapter == seen for seen, _ in pairs):
            raise SettingsError(f"{name}: adapter {adapter!r} is listed twice")
        pairs.append((adapter, path))
    return tuple(pairs)


def parse_folders(name: str, raw: str) -> tuple[str, ...]:
    """``/a,/b`` (commas or colons) -> ("/a", "/b"); each an absolute path."""
    folders = tuple(part.strip() for part in raw.replace(":", ",").split(",") if part.strip())
    relative = [folder for folder in folders if not os.path.isabs(folder)]
    if relative:
        raise SettingsError(f"{name}: {relative[0]!r} is not an absolute path")
    return folders


def parse_seconds(name: str, raw: str) -> float:
    """A strictly positive number of seconds; 0 or ``off`` turns the feature off (None)."""
    value = raw.strip().lower()
    if value in ("0", "off", "none", "false"):
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number of seconds") from None
    if seconds < 0 or seconds != seconds:
        raise SettingsError(f"{name}={raw!r} must be 0 (off) or a positive number of seconds")
    return seconds


def parse_number_in(low: float, high: float, above_low: bool = False) -> Callable[[str, str], float]:
    """A parser of a number in [low, high] (``above_low``: in (low, high])."""

    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a number") from None
        if not ((value > low) if above_low else (value >= low)) or not value <= high:
            raise SettingsError(f"{name}={raw!r} must be in {'(' if above_low else '['}{low:g}, {high:g}]")
        return value

    return parse


def parse_text(name: str, raw: str) -> str:
    return raw.strip()


def parse_template(name: str, raw: str) -> Optional[str]:
    """A chat template given as a file path (read now) or as the Jinja text itself."""
    value = raw.strip()
    if not value:
        return None
    path = os.path.expanduser(value)
    if len(value) < 4096 and "\n" not in value and os.path.isfile(path):  # a path, whatever characters it holds
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{name}={value!r} is a file that cannot be read: {exc}") from None
    if "{{" in value or "{%" in value:
        return value
    raise SettingsError(f"{name}={value!r} is neither a Jinja template (no {{{{ or {{%) nor an existing file")
