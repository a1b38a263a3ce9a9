"""API keys against a real ClickHouse: the middleware on the query app, keys written by KeyStore.

Every expectation is derived from what the test did to the key (created, expired, revoked, scoped), and
revocation and creation are observed through requests (no sleeps standing in for "it happened").
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from meterline.adapters.auth import check_exposure
from meterline.adapters.clickhouse import connect, create_schema
from meterline.adapters.keystore import KeyStore
from meterline.core.access import Scope
from meterline.core.errors import ConfigError
from meterline.core.keys import ApiKey, generate_key, key_hash
from meterline.settings import Settings

SECRET = "test-server-secret-0123456789abcdef"
METERS = [{"slug": "calls", "eventType": "call", "aggregation": "COUNT"}]


@pytest.fixture(scope="module")
def env(clickhouse_url: str) -> Iterator[tuple[str, KeyStore]]:
    from tests.infra import unique

    database = unique("auth")
    client = connect(clickhouse_url)
    create_schema(client, database)
    try:
        yield f"{clickhouse_url}/{database}", KeyStore(client, database)
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")
        client.close()


def _settings(url: str, **extra: object) -> Settings:
    values: dict[str, object] = {
        "clickhouse_url": url, "auth_secret": SECRET, "auth_local_mode": False, "auth_refresh_seconds": 0.2,
        "meters": METERS,
    }
    values.update(extra)
    return Settings(**values)  # type: ignore[arg-type]


def _new_key(store: KeyStore, namespace: str, *scopes: Scope, secret: str = SECRET, **fields: object) -> tuple[str, str]:
    key_id, key = generate_key()
    record = ApiKey(key_id, namespace, frozenset(scopes), key_hash(secret.encode(), key), "t",
                    datetime.now(UTC) - timedelta(minutes=1), **fields)  # type: ignore[arg-type]
    store.add(record)
    return key_id, key


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _until(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_keys_scopes_and_refusals(env: tuple[str, KeyStore]) -> None:
    from query.app import create_app

    url, store = env
    _, reader = _new_key(store, "acme", Scope.READ)
    _, ingester = _new_key(store, "acme", Scope.INGEST)
    _, expired = _new_key(store, "acme", Scope.READ, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    _, foreign = _new_key(store, "acme", Scope.READ, secret="another-servers-secret-0123456789abc")
    _, operator = _new_key(store, "default", Scope.READ)
    with TestClient(create_app(_settings(url))) as http:
        ok = http.get("/api/v1/meters", headers=_bearer(operator))
        assert ok.status_code == 200 and [m["slug"] for m in ok.json()] == ["calls"]
        # config.yaml's meters (here `settings.meters`) are the default namespace's: another tenant has none,
        # and asking for one is the 404 of a meter that does not exist.
        ok = http.get("/api/v1/meters", headers=_bearer(reader))
        assert ok.status_code == 200 and ok.json() == []
        theirs = http.get("/api/v1/meters/calls", headers=_bearer(reader))
        nobodys = http.get("/api/v1/meters/no_such_meter", headers=_bearer(reader))
        assert theirs.status_code == nobodys.status_code == 404
        assert theirs.headers["content-type"] == "application/problem+json"
        assert theirs.text.replace("calls", "M") == nobodys.text.replace("no_such_meter", "M")

        missing = http.get("/api/v1/meters")
        assert missing.status_code == 401
        assert missing.headers["content-type"] == "application/problem+json"
        assert missing.headers["www-authenticate"].startswith("Bearer")

        unknown = "mlk_" + "0" * 16 + "_" + "A" * 43
        bodies = set()
        for header in (f"Bearer {unknown}", f"Bearer {foreign}", f"Bearer {reader}x", "Basic dXNlcjpwdw==",
                       "Bearer", f"bearer {reader[:-3]}"):
            r = http.get("/api/v1/meters/calls", headers={"Authorization": header})
            assert r.status_code == 401, header
            bodies.add(r.json()["detail"])
        # Unknown id, wrong secret and malformed keys get the same words: nothing about what exists.
        assert len(bodies - {"use `Authorization: Bearer <key>`"}) == 1

        r = http.get("/api/v1/meters/calls", headers=_bearer(expired))
        assert r.status_code == 401 and "expired" in r.json()["detail"]

        r = http.get("/api/v1/meters/calls", headers=_bearer(ingester))
        assert r.status_code == 403 and r.json()["status"] == 403
        # The decision does not depend on data: an unknown meter is 403 too, not 404.
        assert http.get("/api/v1/meters/nope/query", headers=_bearer(ingester)).status_code == 403
        assert http.get("/healthz").status_code == 200  # probes stay public


def test_new_and_revoked_keys_take_effect_within_seconds(env: tuple[str, KeyStore]) -> None:
    from query.app import create_app

    url, store = env
    with TestClient(create_app(_settings(url))) as http:
        # Created after the server loaded its view: the miss triggers a reload, so it works at once.
        key_id, key = _new_key(store, "acme", Scope.READ)
        assert http.get("/api/v1/meters", headers=_bearer(key)).status_code == 200
        store.revoke(key_id, datetime.now(UTC))
        started = time.monotonic()
        _until(lambda: http.get("/api/v1/meters", headers=_bearer(key)).status_code == 401)
        assert time.monotonic() - started < 10
        r = http.get("/api/v1/meters", headers=_bearer(key))
        assert "revoked" in r.json()["detail"]


def test_local_mode_keyless_but_keys_still_checked(env: tuple[str, KeyStore]) -> None:
    from query.app import create_app

    url, store = env
    _, reader = _new_key(store, "acme", Scope.READ)
    _, ingester = _new_key(store, "acme", Scope.INGEST)
    with TestClient(create_app(_settings(url, auth_local_mode=True))) as http:
        assert http.get("/api/v1/meters").status_code == 200
        assert http.get("/api/v1/meters", headers=_bearer(reader)).status_code == 200
        assert http.get("/api/v1/meters", headers=_bearer(reader + "x")).status_code == 401
        assert http.get("/api/v1/meters", headers=_bearer(ingester)).status_code == 403


def test_serving_beyond_loopback_needs_keys(env: tuple[str, KeyStore]) -> None:
    url, _ = env
    local = _settings(url, auth_local_mode=True)
    keyed = _settings(url)
    no_secret = _settings(url, auth_secret=None)
    check_exposure(local, "127.0.0.1")
    check_exposure(local, "::1")
    check_exposure(keyed, "0.0.0.0")
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        with pytest.raises(ConfigError, match="loopback"):
            check_exposure(local, host)
    for host in ("127.0.0.1", "0.0.0.0"):
        with pytest.raises(ConfigError, match="AUTH_SECRET"):
            check_exposure(no_secret, host)
    with pytest.raises(ConfigError, match="32"):
        _settings(url, auth_secret="short").auth_secret_bytes()
