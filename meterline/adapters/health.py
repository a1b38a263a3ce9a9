"""Shared `/healthz`, `/readyz` and `/metrics` routes for every meterline HTTP service.

Why a factory taking check callables: ingest needs the broker, query needs ClickHouse, and the combined
`make run` app needs both; each app passes its own checks and the endpoints behave identically.
`/healthz` only says the process serves requests (a liveness probe must not restart a pod because a
dependency is down); `/readyz` says whether requests can succeed right now.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from meterline.adapters.problems import PROBLEM_MEDIA_TYPE, PROBLEM_SCHEMA

logger = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Awaitable[bool]]

_CHECKS = {"type": "object", "additionalProperties": {"type": "string", "enum": ["ok", "unavailable"]}}
_HEALTHZ: dict[str, Any] = {"responses": {"200": {"description": "The process serves requests", "content": {
    "application/json": {"schema": {"type": "object", "required": ["status"],
                                    "properties": {"status": {"type": "string", "enum": ["ok"]}}}}}}}}
_READYZ: dict[str, Any] = {"responses": {
    "200": {"description": "Every dependency answers", "content": {"application/json": {"schema": {
        "type": "object", "required": ["status", "checks"],
        "properties": {"status": {"type": "string", "enum": ["ready"]}, "checks": _CHECKS}}}}},
    "503": {"description": "A dependency is down", "content": {PROBLEM_MEDIA_TYPE: {"schema": {
        **PROBLEM_SCHEMA, "properties": {**PROBLEM_SCHEMA["properties"], "checks": _CHECKS}}}}},
}}


async def _run_check(name: str, check: ReadinessCheck, timeout: float) -> bool:
    try:
        return bool(await asyncio.wait_for(check(), timeout))
    except Exception as exc:  # noqa: BLE001 - any failure (timeout included) means "not ready"
        logger.info("readiness check %s failed: %r", name, exc)
        return False


def health_router(checks: Mapping[str, ReadinessCheck], timeout: float = 2.0,
                  details: Callable[[], Mapping[str, Any]] | None = None) -> APIRouter:
    """Build the health/metrics router; `checks` maps a dependency name to an async probe.

    `details` adds informational entries to /readyz (e.g. whether config.yaml is valid) that do not
    decide readiness: a process serving its last good meters can still answer."""
    router = APIRouter(tags=["Health"])

    @router.get("/healthz", summary="Liveness", response_model=None, openapi_extra=_HEALTHZ)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="Readiness", response_model=None, openapi_extra=_READYZ)
    async def readyz() -> JSONResponse:
        names = list(checks)
        results = await asyncio.gather(*(_run_check(n, checks[n], timeout) for n in names))
        status = {n: ("ok" if ok else "unavailable") for n, ok in zip(names, results, strict=True)}
        extra = dict(details()) if details is not None else {}
        if all(results):
            return JSONResponse({"status": "ready", "checks": status, **extra})
        down = ", ".join(n for n, ok in zip(names, results, strict=True) if not ok)
        return JSONResponse(
            {
                "type": "about:blank",
                "title": "Service unavailable",
                "status": 503,
                "detail": f"not reachable within {timeout:g}s: {down}",
                "checks": status,
                **extra,
            },
            status_code=503,
            media_type="application/problem+json",
            headers={"Retry-After": "5"},
        )

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router


def supervisor_check(status_file: str) -> ReadinessCheck:
    """Readiness of the processes `meterline run` supervises (meterline/localinfra/supervisor.py writes
    `{"processes": {name: {"state": ...}}}`): ready while every one is running, not while one is
    restarting (a crash loop shows here, and in the run's log, until it stays up)."""

    def read() -> bool:
        try:
            status = json.loads(Path(status_file).read_text())
        except (OSError, ValueError):
            return True  # no supervisor (or not written yet): nothing to report
        processes = status.get("processes", {}) if isinstance(status, dict) else {}
        return all(p.get("state") == "running" for p in processes.values() if isinstance(p, dict))

    async def check() -> bool:
        return await asyncio.to_thread(read)

    return check


def state_details(app: Any) -> Mapping[str, Any]:
    """`app.state.readiness_details()` if the composition root set one (see `health_router`)."""
    provider = getattr(app.state, "readiness_details", None)
    return provider() if provider is not None else {}
