"""Schema-driven fuzz of every documented endpoint on the live stack: no input may produce a 5xx, and
every response must match the schema the OpenAPI document gives for its status and content type.

The infrastructure is up for the whole run, so a 503 would be a bug too; bad input must come back as
a 4xx problem. Examples are bounded so `make test` stays fast.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from meterline.localinfra.stack import LocalStack

pytestmark = pytest.mark.e2e


def _weak_schemas(document: dict[str, Any]) -> list[str]:
    """JSON answers documented as `{}` or a bare `{"type": "object"}` say nothing about their shape."""
    weak = []
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation.get("responses", {}).items():
                for media, content in (response.get("content") or {}).items():
                    schema = content.get("schema") or {}
                    if "json" in media and not (schema.get("$ref") or schema.get("properties") or schema.get("items")
                                                or schema.get("anyOf") or schema.get("additionalProperties")):
                        weak.append(f"{method.upper()} {path} {status} {media}")
    return weak


def test_no_endpoint_answers_5xx(stack: LocalStack) -> None:
    import schemathesis
    from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{stack.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {(op.method.upper(), op.path) for op in operations}
    assert ("GET", "/api/v1/meters/{meterIdOrSlug}/query") in paths and ("POST", "/api/v1/events") in paths
    assert ("POST", "/api/v1/meters/{meterIdOrSlug}/query") in paths and ("GET", "/api/v2/events") in paths
    assert not _weak_schemas(schema.raw_schema), "every answer needs a real schema"
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            response = case.call(base_url=stack.url)
            assert response.status_code < 500, (case.method, case.path, case.query, response.text)
            case.validate_response(
                response, checks=[not_a_server_error, response_schema_conformance, content_type_conformance]
            )

        check()
