"""Two tenants on one running stack, each with its own keys and meters: every meter, event, window, dead
letter, subject, portal token and dedupe key belongs to the namespace of the key that made it.

Both tenants define a meter `calls` (each its own definition), tenant A also `tokens`; both send the same
(source, id) pairs, and tenant A resends them: each namespace counts each pair exactly once, with its own
meters only. Tenant B then tries every read endpoint on A's meter, subjects and tokens: 404 (or an empty
answer) that looks exactly like asking for something that does not exist. Every expectation is computed
here from what each tenant sent.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from meterline.adapters.clickhouse import connect
from meterline.localinfra.stack import LocalStack
from tests.e2e.test_keys import create_key
from tests.oracle import OracleMeter, config_yaml, meter_body
from tests.tenants import create_meters

pytestmark = pytest.mark.e2e

#: config.yaml's meters: the default namespace's, so no tenant sees or is metered by them.
CONFIG_METERS = [OracleMeter("calls", "call", "COUNT", None), OracleMeter("tokens", "call", "SUM", "n")]
#: Each tenant's own meters (created through the API). Same slug `calls`, different meanings.
TENANT_METERS = {
    "acme": [OracleMeter("calls", "call", "COUNT", None, ("tenant",)), OracleMeter("tokens", "call", "SUM", "n")],
    "beta": [OracleMeter("calls", "call", "SUM", "n", ("tenant",))],
}
BATCH = {"Content-Type": "application/cloudevents-batch+json"}
RANGE = "from=2024-03-01T00:00:00Z&to=2024-03-02T00:00:00Z"
EVENTS_FROM = "from=2024-03-01T00:00:00Z"  # the event list defaults to recent event times


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory, kafka_bootstrap: str, clickhouse_url: str) -> Iterator[LocalStack]:
    root: Path = tmp_path_factory.mktemp("tenants")
    config = root / "config.yaml"
    config.write_text(config_yaml(CONFIG_METERS))
    with LocalStack(
        data_dir=root, config_file=config, processors=1, partitions=2, kafka_bootstrap=kafka_bootstrap,
        clickhouse_url=clickhouse_url, extra_env={"METERLINE_AUTH_LOCAL_MODE": "false"},
    ) as running:
        yield running


def _events(tenant: str, n: int) -> list[dict[str, Any]]:
    """The same (source, id) pairs for every tenant; the data says whose event it is."""
    return [{"specversion": "1.0", "type": "call", "id": f"e{i}", "source": "shared", "subject": f"s{i % 2}",
             "time": f"2024-03-01T00:{i:02d}:00Z", "data": {"n": i + 1, "tenant": tenant}} for i in range(n)]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _get(http: httpx.Client, key: str, path: str) -> Any:
    r = http.get(path, headers=_bearer(key))
    assert r.status_code == 200, (path, r.text)
    return r.json()


def _wait(predicate: Any, stack: LocalStack, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        stack.assert_running()
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _same_not_found(theirs: httpx.Response, nobodys: httpx.Response, name: str, missing: str) -> None:
    """Another tenant's thing is answered exactly as a thing that does not exist: 404 problem+json, no data."""
    assert theirs.status_code == nobodys.status_code == 404, (theirs.text, nobodys.text)
    assert theirs.headers["content-type"] == "application/problem+json"
    assert theirs.text.replace(name, "X") == nobodys.text.replace(missing, "X")


@dataclass(frozen=True)
class Populated:
    """What the two tenants did: their keys and what each sent (acme's `only-a` and beta's `only-b` are
    dead letters; `secret-subject-a` is a subject only acme has)."""

    a: str
    b_admin: str
    b: str
    sent: dict[str, list[dict[str, Any]]]
    only_a: dict[str, Any]
    only_b: dict[str, Any]


@pytest.fixture(scope="module")
def populated(tenants: LocalStack) -> Populated:
    """Both tenants' meters created and their events sent (the tests wait for them to be counted)."""
    a = create_key(tenants, "acme", "ingest,read,admin")
    b_admin, b = create_key(tenants, "beta", "ingest,read,admin"), create_key(tenants, "beta", "read")
    sent = {"acme": _events("acme", 10), "beta": _events("beta", 6)}
    only_a = {**sent["acme"][0], "id": "only-a", "subject": "secret-subject-a", "data": {"tenant": "acme"}}
    only_b = {**sent["beta"][0], "id": "only-b", "data": {"tenant": "beta"}}
    with httpx.Client(base_url=tenants.url, timeout=10) as http:
        for ns, key in (("acme", a), ("beta", b_admin)):
            create_meters(http, _bearer(key), [meter_body(m) for m in TENANT_METERS[ns]])

        def post(key: str, events: list[dict[str, Any]]) -> None:
            r = http.post("/api/v1/events", json=events, headers={**BATCH, **_bearer(key)})
            assert r.status_code == 204, r.text

        post(b_admin, [*sent["beta"], only_b])  # B first: A's later copies of the same (source, id) count for A
        post(a, sent["acme"])
        post(a, sent["acme"])  # a retry inside A: duplicates, counted once
        post(a, [only_a])  # no `n`: a `tokens` dead letter, and a subject only A has
    return Populated(a, b_admin, b, sent, only_a, only_b)


def test_namespaces_are_isolated_end_to_end(tenants: LocalStack, populated: Populated) -> None:
    p = populated
    a, b_admin, b, sent, only_b = p.a, p.b_admin, p.b, p.sent, p.only_b
    with httpx.Client(base_url=tenants.url, timeout=10) as http:
        # The oracle: each tenant's meters over each tenant's first sightings only.
        expected = {
            "acme": {"calls": len(sent["acme"]) + 1, "tokens": sum(e["data"]["n"] for e in sent["acme"])},
            "beta": {"calls": sum(e["data"]["n"] for e in sent["beta"])},
        }

        def totals(key: str, ns: str) -> dict[str, Any]:
            out = {}
            for meter in expected[ns]:
                data = _get(http, key, f"/api/v1/meters/{meter}/query?{RANGE}")["data"]
                out[meter] = data[0]["value"] if data else 0
            return out

        _wait(lambda: totals(a, "acme") == expected["acme"] and totals(b, "beta") == expected["beta"], tenants,
              f"totals never matched {expected}")

        # Meters: each tenant lists its own definitions; config.yaml's (the default namespace's) are nobody's.
        listed = {ns: {m["slug"]: m["aggregation"] for m in _get(http, key, "/api/v1/meters")}
                  for ns, key in (("acme", a), ("beta", b))}
        assert listed == {ns: {m.slug: m.aggregation for m in ms} for ns, ms in TENANT_METERS.items()}
        tokens_id = _get(http, a, "/api/v1/meters/tokens")["id"]
        for path, missing in (("/api/v1/meters/tokens", "/api/v1/meters/no_such_meter"),
                              (f"/api/v1/meters/{tokens_id}", "/api/v1/meters/no_such_meter"),
                              (f"/api/v1/meters/tokens/query?{RANGE}", f"/api/v1/meters/no_such_meter/query?{RANGE}"),
                              (f"/api/v1/meters/tokens/subjects?{RANGE}",
                               f"/api/v1/meters/no_such_meter/subjects?{RANGE}"),
                              (f"/api/v1/meters/tokens/group-by/subject/values?{RANGE}",
                               f"/api/v1/meters/no_such_meter/group-by/subject/values?{RANGE}")):
            name = tokens_id if tokens_id in path else "tokens"
            _same_not_found(http.get(path, headers=_bearer(b)), http.get(missing, headers=_bearer(b)),
                            name, "no_such_meter")
        body = {"from": "2024-03-01T00:00:00Z", "to": "2024-03-02T00:00:00Z"}
        _same_not_found(http.post("/api/v1/meters/tokens/query", json=body, headers=_bearer(b)),
                        http.post("/api/v1/meters/no_such_meter/query", json=body, headers=_bearer(b)),
                        "tokens", "no_such_meter")
        # B's admin key cannot change or delete A's meter either, and A's meter is untouched.
        _same_not_found(http.put("/api/v1/meters/tokens", json={"name": "mine"}, headers=_bearer(b_admin)),
                        http.put("/api/v1/meters/no_such_meter", json={"name": "mine"}, headers=_bearer(b_admin)),
                        "tokens", "no_such_meter")
        _same_not_found(http.delete("/api/v1/meters/tokens", headers=_bearer(b_admin)),
                        http.delete("/api/v1/meters/no_such_meter", headers=_bearer(b_admin)),
                        "tokens", "no_such_meter")
        assert _get(http, a, "/api/v1/meters/tokens")["name"] == "tokens"
        # The processor metered B's events with B's meters only: no row of A's `tokens` in B's namespace.
        ch = connect(tenants.clickhouse_db_url)
        try:
            rows = ch.query(f"SELECT namespace, meter, count() FROM {tenants.database}.meter_windows"
                            " GROUP BY namespace, meter").result_rows
        finally:
            ch.close()
        assert {(ns, m) for ns, m, _ in rows} == {(ns, m.slug) for ns, ms in TENANT_METERS.items() for m in ms}

        # Group values: each tenant's `calls` grouped only its own events.
        for ns, key in (("acme", a), ("beta", b)):
            assert _get(http, key, f"/api/v1/meters/calls/group-by/tenant/values?{RANGE}") == [ns]

        # Raw events (v1 and v2): each tenant sees exactly its own, though ids and sources are the same.
        seen_b = _get(http, b, f"/api/v1/events?limit=100&{EVENTS_FROM}")
        assert sorted(e["event"]["id"] for e in seen_b) == sorted(e["id"] for e in [*sent["beta"], only_b])
        assert {e["event"]["data"]["tenant"] for e in seen_b} == {"beta"}
        assert _get(http, b, f"/api/v1/events?id=only-a&{EVENTS_FROM}") == []
        assert [e["event"]["id"] for e in _get(http, a, f"/api/v1/events?id=only-a&{EVENTS_FROM}")] == ["only-a"]
        assert {e["event"]["data"]["tenant"] for e in _get(http, b, "/api/v2/events")["items"]} == {"beta"}

        # Dead letters: each tenant's rejection is its own (A's `tokens`, B's `calls`).
        letters = {ns: [(d["event"]["id"], d["meter"]) for d in _get(http, key, "/api/v1/dead-letters")]
                   for ns, key in (("acme", a), ("beta", b))}
        assert letters == {"acme": [("only-a", "tokens")], "beta": [("only-b", "calls")]}

        # Subjects: B never learns A's subject, through a meter, by grouping, or from the subjects API.
        assert "secret-subject-a" in _get(http, a, f"/api/v1/meters/calls/subjects?{RANGE}")
        assert "secret-subject-a" not in _get(http, b, f"/api/v1/meters/calls/subjects?{RANGE}")
        grouped = _get(http, b, f"/api/v1/meters/calls/query?{RANGE}&groupBy=subject")["data"]
        by_subject: dict[str, int] = {}
        for e in sent["beta"]:
            by_subject[e["subject"]] = by_subject.get(e["subject"], 0) + e["data"]["n"]
        assert {d["subject"]: d["value"] for d in grouped} == by_subject
        filtered = _get(http, b, f"/api/v1/meters/calls/query?{RANGE}&subject=secret-subject-a")["data"]
        assert all(d["value"] == 0 for d in filtered)
        r = http.post("/api/v1/subjects", json=[{"key": "secret-subject-a", "displayName": "A's customer"}],
                      headers=_bearer(a))
        assert r.status_code == 200, r.text
        assert [s["key"] for s in _get(http, a, "/api/v1/subjects")] == ["secret-subject-a"]
        assert _get(http, b, "/api/v1/subjects") == []
        _same_not_found(http.get("/api/v1/subjects/secret-subject-a", headers=_bearer(b)),
                        http.get("/api/v1/subjects/no-such-subject", headers=_bearer(b)),
                        "secret-subject-a", "no-such-subject")
        assert "secret-subject-a" in http.get("/api/v1/debug/metrics", headers=_bearer(a)).text
        assert "secret-subject-a" not in http.get("/api/v1/debug/metrics", headers=_bearer(b)).text

        # Portal tokens: A's are A's. B cannot list, use, revoke or bind to A's meter.
        r = http.post("/api/v1/portal/tokens", json={"subject": "s0", "allowedMeterSlugs": ["tokens"]},
                      headers=_bearer(a))
        assert r.status_code == 200, r.text
        token = r.json()
        portal = {"Authorization": f"Bearer {token['token']}"}
        s0_tokens = sum(e["data"]["n"] for e in sent["acme"] if e["subject"] == "s0")
        assert [d["value"] for d in _get(http, token["token"], f"/api/v1/portal/meters/tokens/query?{RANGE}")["data"]] \
            == [s0_tokens]
        assert _get(http, b_admin, "/api/v1/portal/tokens") == []
        assert http.get("/api/v1/portal/tokens", headers=_bearer(b)).status_code == 403  # read keys: no tokens
        theirs = http.post("/api/v1/portal/tokens", json={"subject": "s0", "allowedMeterSlugs": ["tokens"]},
                           headers=_bearer(b_admin))
        nobodys = http.post("/api/v1/portal/tokens", json={"subject": "s0", "allowedMeterSlugs": ["no_such_meter"]},
                            headers=_bearer(b_admin))
        assert theirs.status_code == nobodys.status_code == 400
        assert theirs.text.replace("'tokens'", "'X'") == nobodys.text.replace("'no_such_meter'", "'X'")
        assert http.post("/api/v1/portal/tokens/invalidate", json={"id": token["id"]},
                         headers=_bearer(b_admin)).status_code == 204
        assert http.get(f"/api/v1/portal/meters/tokens/query?{RANGE}", headers=portal).status_code == 200
        assert http.get(f"/api/v1/meters/calls/query?{RANGE}", headers=portal).status_code == 403


def test_fuzzing_every_read_with_each_tenants_key_never_shows_the_other_tenant(
        tenants: LocalStack, populated: Populated) -> None:
    """Schemathesis over every read operation (GETs and the POST query), once per tenant's read key: no
    answer is a 5xx, and no answer carries anything of the other tenant (its ids, subjects, data, meter id),
    with meter paths drawn from both tenants' slugs and the other tenant's meter id."""
    import schemathesis

    with httpx.Client(base_url=tenants.url, timeout=10) as http:
        # Counted first, so the fuzz reads tenants whose windows, subjects and dead letters exist.
        _wait(lambda: len(_get(http, populated.a, "/api/v1/dead-letters")) == 1
              and len(_get(http, populated.b, "/api/v1/dead-letters")) == 1, tenants, "dead letters never stored")
        tokens_id = _get(http, populated.a, "/api/v1/meters/tokens")["id"]
    schema = schemathesis.openapi.from_url(f"{tenants.url}/openapi.json")
    reads = [op for op in (r.ok() for r in schema.get_all_operations())
             if op.method.upper() == "GET" or (op.method.upper() == "POST" and op.path.endswith("/query"))]
    assert len(reads) >= 12, [op.path for op in reads]
    #: what would betray the other tenant: its event ids, subject, data and meter id
    others = {populated.b: ("only-a", "secret-subject-a", "acme", tokens_id), populated.a: ("only-b", "beta")}
    for key, foreign in others.items():
        for operation in reads:
            _fuzz(operation, tenants.url, key, foreign, ["calls", "tokens", tokens_id])


def _fuzz(operation: Any, url: str, key: str, foreign: tuple[str, ...], slugs: list[str]) -> None:
    """A few schemathesis cases of one operation with `key`: never a 5xx, never a `foreign` string."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error

    @given(case=operation.as_strategy(), slug=st.sampled_from(slugs))
    @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: Any, slug: str) -> None:
        if case.path_parameters and "meterIdOrSlug" in case.path_parameters:
            case.path_parameters["meterIdOrSlug"] = slug
        response = case.call(base_url=url, headers=_bearer(key))
        assert response.status_code < 500, (case.method, case.path, case.query, response.text)
        case.validate_response(response, checks=[not_a_server_error])
        asked = f"{response.request.url} {response.request.body!r}"  # an error may echo what was asked
        leaked = [f for f in foreign if f in response.text and f not in asked]
        assert not leaked, (case.method, case.formatted_path, case.query, leaked, response.text[:500])

    check()


def test_openmeter_python_sdk_with_a_key(tenants: LocalStack) -> None:
    """The unmodified OpenMeter Python SDK (`Client(endpoint, token=key)`) ingests and queries in its namespace."""
    from tests.conformance import sdks

    driver = Path(sdks.__file__).parent / "drivers" / "openmeter_py.py"

    key = create_key(tenants, "sdk-tenant", "ingest,read")
    with httpx.Client(base_url=tenants.url, timeout=10) as http:  # the tenant's meter, by its admin
        create_meters(http, _bearer(create_key(tenants, "sdk-tenant", "read,admin")), [meter_body(CONFIG_METERS[0])])
    events = [{**e, "source": "sdk"} for e in _events("sdk-tenant", 4)]
    calls = [{"op": "events.ingest_events", "args": [[{"model": "Event", "value": e} for e in events]]}]
    python = sdks.python_sdk()

    def run(calls: list[dict[str, Any]], token: str | None = key) -> list[dict[str, Any]]:
        request = {"endpoint": tenants.url, "calls": calls, **({"token": token} if token else {})}
        done = subprocess.run([str(python), str(driver)], input=json.dumps(request),
                              capture_output=True, text=True, timeout=300, check=True)
        return list(json.loads(done.stdout))

    assert "error" not in run(calls)[0]
    assert run(calls, token=None)[0]["error"]["status"] == 401  # no key: refused, local mode is off
    query = [{"op": "meters.query_json", "args": ["calls"],
              "kwargs": {"from_parameter": "2024-03-01T00:00:00+00:00", "to": "2024-03-02T00:00:00+00:00"}}]

    def total() -> Any:
        answer = run(query)[0]
        rows = answer.get("ok", {}).get("data", [])
        return rows[0]["value"] if rows else 0

    _wait(lambda: total() == len(events), tenants, "the SDK's events were never counted in its namespace")
