"""A tenant's meters in tests: created through the API with that tenant's admin key (config.yaml's meters
belong to the default namespace only, docs/design.md "Tenants"), then awaited until the meter controller
has built and activated them, so queries answer instead of 503."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol


class Http(Protocol):
    """What both `fastapi.testclient.TestClient` and `httpx.Client` offer."""

    def get(self, url: str, *, headers: Mapping[str, str]) -> Any: ...
    def post(self, url: str, *, json: Any, headers: Mapping[str, str]) -> Any: ...


def create_meters(http: Http, admin: Mapping[str, str], meters: Iterable[Mapping[str, Any]],
                  timeout: float = 60) -> None:
    """Create `meters` (API bodies) in the namespace of `admin` (a key with admin and read scopes) and wait
    until every one is ready."""
    slugs = []
    for body in meters:
        r = http.post("/api/v1/meters", json=dict(body), headers=admin)
        assert r.status_code == 201, r.text
        slugs.append(body["slug"])
    deadline = time.monotonic() + timeout
    while True:
        states = {m["slug"]: m["annotations"]["meterline.state"] for m in http.get("/api/v1/meters", headers=admin).json()}
        if all(states.get(s) == "ready" for s in slugs):
            return
        assert time.monotonic() < deadline, f"meters never became ready: {states}"
        time.sleep(0.1)
