"""/openapi.json (built from the app's routes and request models) and /docs, a self-contained HTML rendering of it."""

from __future__ import annotations

import html
import json
from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from serve.http.openapi import build_openapi

blueprint = Blueprint("docs", __name__)

CONSTRAINTS = (
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
)
STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "h2{border-top:1px solid #ccc;padding-top:1rem}code{background:#f3f3f3;padding:0 .2rem}"
    "table{border-collapse:collapse;margin:.5rem 0}"
    "td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}"
)


def openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document, built on first use (routes and models do not change while serving)."""
    extensions = current_app.extensions
    if "serve.http.openapi" not in extensions:
        settings = extensions["serve.settings"]
        extensions["serve.http.openapi"] = build_openapi(current_app, api_key_required=bool(settings.api_key))
    return extensions["serve.http.openapi"]


@blueprint.get("/openapi.json")
def openapi_json() -> Response:
    """This server's OpenAPI 3.1 document."""
    return jsonify(openapi_document())


@blueprint.get("/docs")
def docs() -> Response:
    """The OpenAPI document as one HTML page (no scripts, nothing fetched from elsewhere)."""
    return Response(render_html(openapi_document()), mimetype="text/html")


def render_html(document: dict[str, Any]) -> str:
    """Every operation with its request fields and responses, then every schema's fields."""
    info = document["info"]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(info['title'])} API</title>",
        f"<style>{STYLE}</style></head><body><h1>{_e(info['title'])} {_e(info['version'])}</h1>",
        f"<p>{_e(info.get('description', ''))} Machine-readable: <a href='/openapi.json'>/openapi.json</a>.</p>",
    ]
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            parts.append(_operation_html(path, method, operation))
    parts.append("<h2>Schemas</h2>")
    for name, schema in document["components"]["schemas"].items():
        parts.append(f"<h3 id='schema-{_e(name)}'>{_e(name)}</h3>{_fields_html(schema)}")
    parts.append("</body></html>")
    return "".join(parts)


def _operation_html(path: str, method: str, operation: dict[str, Any]) -> str:
    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    request = f"<p>Request body: {_type(body)}</p>" if body else ""
    rows = "".join(
        f"<tr><td>{_e(code)}</td><td>{_e(response['description'])}</td>"
        f"<td>{', '.join(_e(kind) for kind in response.get('content', {}))}</td></tr>"
        for code, response in operation["responses"].items()
    )
    secured = "<p>Requires <code>Authorization: Bearer &lt;API_KEY&gt;</code>.</p>" if operation.get("security") else ""
    return (
        f"<h2 id='{_e(operation['operationId'])}'><code>{_e(method.upper())} {_e(path)}</code></h2>"
        f"<p>{_e(operation['summary'])}</p>{secured}{request}<table><tr><th>status</th><th>meaning</th><th>content</th></tr>{rows}</table>"
    )


def _fields_html(schema: dict[str, Any]) -> str:
    properties = schema.get("properties")
    if not properties:
        return f"<p>{_type(schema)}</p>"
    required = set(schema.get("required", []))
    rows = "".join(
        f"<tr><td><code>{_e(name)}</code>{' (required)' if name in required else ''}</td><td>{_type(field)}</td>"
        f"<td>{_e(json.dumps(field['default'])) if 'default' in field else ''}</td><td>{_constraints(field)}</td>"
        f"<td>{_e(field.get('description', ''))}</td></tr>"
        for name, field in properties.items()
    )
    return f"<table><tr><th>field</th><th>type</th><th>default</th><th>limits</th><th>notes</th></tr>{rows}</table>"


def _type(schema: Any) -> str:
    """A short, linked, HTML-escaped description of a schema's type."""
    if not isinstance(schema, dict):
        return "any" if schema is True or schema is None else "nothing"
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"<a href='#schema-{_e(name)}'>{_e(name)}</a>"
    for combinator in ("anyOf", "oneOf", "allOf"):
        if combinator in schema:
            return " | ".join(_type(member) for member in schema[combinator])
    if "const" in schema:
        return _e(json.dumps(schema["const"]))
    if "enum" in schema:
        return " | ".join(_e(json.dumps(value)) for value in schema["enum"])
    if schema.get("type") == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if schema.get("type") == "object" and "additionalProperties" in schema:
        return f"object of {_type(schema['additionalProperties'])}"
    return _e(schema.get("type", "any"))


def _constraints(schema: dict[str, Any]) -> str:
    members = [schema, *schema.get("anyOf", [])]
    found = [f"{key} {member[key]}" for member in members for key in CONSTRAINTS if key in member]
    return _e(", ".join(found))


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)
