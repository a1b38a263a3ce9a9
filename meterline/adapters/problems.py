"""RFC 7807 problem+json responses and the exception handlers of the ingest API.

This is the ONLY place where ingest maps errors to HTTP statuses (as OpenMeter's
`ingest/httpdriver/errors.go` does): routes raise meterline errors or the request errors below, and
`install_problem_handlers` turns each into one well-formed `application/problem+json` response.

Why so many handlers: FastAPI's defaults answer 422 for validation and a bare 500 text for surprises;
a metering client must be able to tell "fix your request" (4xx, never retry) from "try again" (503,
with Retry-After), so bad input always maps to 400/413/415 and never to 422 or 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from meterline.core.errors import BrokerUnavailableError, InvalidEventError, RateLimitedError

logger = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
#: Seconds a client should wait before retrying a 503 (roughly one produce timeout).
RETRY_AFTER_SECONDS = 5
#: At most this many `errors` entries in one 400; `errorsNotListed` counts the rest.
MAX_LISTED_ERRORS = 100


PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "title", "status"],
    "properties": {
        "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
        "detail": {"type": "string"}, "instance": {"type": "string"},
        "extensions": {"type": "object", "properties": {
            "validationErrors": {"type": "array", "items": {"type": "object"}}}},
        "errors": {"type": "array", "items": {"type": "object", "properties": {
            "field": {"type": "string"}, "message": {"type": "string"}, "index": {"type": "integer"}}}},
    },
    "description": "RFC 7807 problem details; per-field errors in extensions.validationErrors (and errors).",
}
"""The OpenAPI schema of every problem+json body, for each service's document."""


class ProblemResponse(JSONResponse):
    """A JSONResponse with the RFC 7807 media type."""

    media_type = PROBLEM_MEDIA_TYPE


class RequestProblem(Exception):
    """A request that cannot be read as events at all (before any event is looked at)."""


class BodyTooLargeError(RequestProblem):
    """The body exceeds `max_body_bytes` (by Content-Length or by what was actually streamed)."""


class UnsupportedContentTypeError(RequestProblem):
    """The Content-Type is not one of the CloudEvents JSON media types."""


class MalformedBodyError(RequestProblem):
    """The body is not valid UTF-8 JSON, or has the wrong top-level shape for its content type."""


def problem(
    status: int,
    title: str,
    detail: str | None = None,
    *,
    type_: str = "about:blank",
    instance: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> ProblemResponse:
    """Build one problem+json response `{type, title, status, detail, instance?, extensions?, errors?, **extra}`.

    Per-field errors go into `extensions.validationErrors` (where OpenMeter's problem details carry
    them) and, for clients of earlier meterline versions, also into the top-level `errors`. `detail`
    always names the problem, since it is what both OpenMeter SDKs show as the error message.
    """
    body: dict[str, Any] = {"type": type_, "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    if instance is not None:
        body["instance"] = instance
    if errors is not None:
        body["extensions"] = {"validationErrors": [{"code": "validation_error", **e} for e in errors]}
        body["errors"] = errors
    if extra:
        body.update(extra)
    return ProblemResponse(body, status_code=status, headers=headers)


def _instance(request: Request) -> str:
    return request.url.path


async def _invalid_event(request: Request, exc: Exception) -> ProblemResponse:
    """400 listing the first MAX_LISTED_ERRORS problems and how many more there are: a 1 MB body can hold
    50k bad numbers, and listing each made a 13 MB answer that helps nobody fix the request."""
    assert isinstance(exc, InvalidEventError)
    listed = exc.errors[:MAX_LISTED_ERRORS]
    rest = len(exc.errors) - len(listed)
    detail = str(exc) if not rest else f"{exc}; the first {len(listed)} problems are listed, {rest} more are not"
    response = problem(
        400,
        "Invalid events",
        detail,
        instance=_instance(request),
        errors=listed,
        type_="https://meterline.dev/problems/invalid-event",
        extra={"errorsNotListed": rest} if rest else None,
    )
    return response


async def _broker_unavailable(request: Request, exc: Exception) -> ProblemResponse:
    logger.warning("publish failed for %s: %s", request.url.path, exc)
    return problem(
        503,
        "Broker unavailable",
        str(exc),
        instance=_instance(request),
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        type_="https://meterline.dev/problems/broker-unavailable",
    )


async def _rate_limited(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, RateLimitedError)
    return problem(429, "Too many requests", str(exc), instance=_instance(request),
                   headers={"Retry-After": str(exc.retry_after)})


async def _request_problem(request: Request, exc: Exception) -> ProblemResponse:
    if isinstance(exc, BodyTooLargeError):
        return problem(413, "Payload too large", str(exc), instance=_instance(request))
    if isinstance(exc, UnsupportedContentTypeError):
        return problem(415, "Unsupported media type", str(exc), instance=_instance(request))
    return problem(400, "Malformed request body", str(exc), instance=_instance(request))


async def _validation(request: Request, exc: Exception) -> ProblemResponse:
    """FastAPI's own validation (query/path/body models) becomes a 400 with per-field errors, not 422."""
    assert isinstance(exc, RequestValidationError)
    errors = [
        {
            "field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "request",
            "message": e.get("msg", ""),
        }
        for e in exc.errors()
    ]
    return problem(
        400,
        "Invalid request",
        "the request parameters are invalid",
        instance=_instance(request),
        errors=errors,
    )


async def _http_exception(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = 400 if exc.status_code == 422 else exc.status_code
    title = {404: "Not found", 405: "Method not allowed"}.get(status, "Request failed")
    detail = exc.detail if isinstance(exc.detail, str) else None
    return problem(status, title, detail, instance=_instance(request), headers=dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> ProblemResponse:
    """Last resort: a bug, not bad input (every bad input has an explicit mapping above)."""
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "Internal server error", "an unexpected error occurred", instance=_instance(request))


def install_problem_handlers(app: FastAPI) -> None:
    """Register every ingest error mapping on `app` (call once per app, ingest-only or combined)."""
    app.add_exception_handler(InvalidEventError, _invalid_event)
    app.add_exception_handler(BrokerUnavailableError, _broker_unavailable)
    app.add_exception_handler(RequestProblem, _request_problem)
    app.add_exception_handler(RateLimitedError, _rate_limited)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _unexpected)
