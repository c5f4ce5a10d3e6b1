"""/openapi.json and /docs on the real server, and schemathesis fuzzing every documented operation against it."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from serve.http.schemas import openai as oa
from serve.http.schemas import tgi
from tests.hardening.conftest import drained, healthy

pytestmark = pytest.mark.e2e

ROUTES = {
    "/ping": "get",
    "/invocations": "post",
    "/v1/chat/completions": "post",
    "/v1/completions": "post",
    "/v1/responses": "post",
    "/v1/models": "get",
    "/generate": "post",
    "/generate_stream": "post",
    "/tokenize": "post",
    "/info": "get",
    "/health": "get",
    "/metrics": "get",
    "/openapi.json": "get",
    "/docs": "get",
    "/": "post",
}
FUZZ_EXAMPLES = 10
FUZZ_TOKENS = 4


def bound_generation(case) -> None:
    """Keep fuzzed generations short (a schema-valid length can take minutes on a busy CPU); every other field as
    drawn."""
    body = case.body if isinstance(case.body, dict) else None
    if body is None:
        return
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if isinstance(body.get(field), int) and body[field] > FUZZ_TOKENS:
            body[field] = FUZZ_TOKENS
    if isinstance(body.get("inputs"), str):
        parameters = body.setdefault("parameters", {})
        if isinstance(parameters, dict):
            drawn = parameters.get("max_new_tokens")
            parameters["max_new_tokens"] = min(drawn, FUZZ_TOKENS) if isinstance(drawn, int) else FUZZ_TOKENS


def test_openapi_documents_every_route_with_the_request_models(hardened_server):
    document = requests.get(hardened_server.url + "/openapi.json", timeout=10).json()
    assert document["openapi"].startswith("3.1")
    for path, method in ROUTES.items():
        assert method in document["paths"][path], path
    schemas = document["components"]["schemas"]
    # built from the models at run time: every field of the request models is there
    for model in (oa.ChatCompletionRequest, oa.CompletionRequest, tgi.GenerateRequest, tgi.TokenizeRequest):
        assert set(model.model_fields) <= set(schemas[model.__name__]["properties"]), model.__name__
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert {"200", "400", "413", "429"} <= set(chat["responses"]) and "422" not in chat["responses"]  # OpenAI's 400s
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    messages = schemas["ChatCompletionRequest"]["properties"]["messages"]
    assert messages["minItems"] == 1 and "messages" in schemas["ChatCompletionRequest"]["required"]


def test_docs_page_is_self_contained_html(hardened_server):
    response = requests.get(hardened_server.url + "/docs", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/html")
    page = response.text
    for path, method in ROUTES.items():
        assert f"{method.upper()} {path}</code>" in page, path
    assert "<script" not in page and "http://" not in page and "https://" not in page  # nothing fetched from elsewhere
    assert "max_tokens" in page and "id='schema-ChatCompletionRequest'" in page


@pytest.fixture(scope="session")
def api_schema(hardened_server):
    return schemathesis.openapi.from_url(hardened_server.url + "/openapi.json")


@pytest.mark.parametrize("path", sorted(ROUTES))
def test_fuzzed_requests_get_no_5xx_and_match_the_schema(api_schema, hardened_server, path):
    """Schema-valid (and schemathesis' edge-case) requests: never a 5xx; status, content type and body as documented."""
    operation = api_schema[path][ROUTES[path].upper()]
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def fuzz(case):
        bound_generation(case)
        case.call_and_validate(base_url=hardened_server.url, checks=checks, timeout=60)

    fuzz()
    drained(hardened_server)  # nothing the fuzzed requests started outlives their answers (or holds admission places)


def test_server_is_healthy_after_fuzzing(hardened_server):
    healthy(hardened_server)
    assert "unhandled error" not in hardened_server.log()
