"""Scopes per route, key format and hashing, expiry: pure rules of meterline.core.access / core.keys."""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterline.core.access import KEY_SCOPES, Principal, Scope, check_namespace, parse_scopes, required_scope
from meterline.core.keys import ApiKey, generate_key, hash_matches, key_hash, key_id_of, parse_expiry

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("method", "path", "scope"), [
    ("POST", "/api/v1/events", Scope.INGEST),
    ("GET", "/api/v1/events", Scope.READ),
    ("GET", "/api/v1/meters/tokens/query", Scope.READ),
    ("HEAD", "/api/v1/meters", Scope.READ),
    ("GET", "/api/v1/dead-letters", Scope.READ),
    ("POST", "/api/v1/meters", Scope.ADMIN),
    ("POST", "/api/v1/meters/tokens/query", Scope.READ),
    ("POST", "/api/v1/meters/tokens/query/x", Scope.ADMIN),
    ("DELETE", "/api/v1/meters/tokens", Scope.ADMIN),
    ("GET", "/api/v1/portal/meters/tokens/query", Scope.PORTAL),
    ("POST", "/api/v1/portal/tokens", Scope.ADMIN),
    ("GET", "/api/v1/portal/tokens", Scope.ADMIN),
    ("POST", "/api/v1/portal/tokens/invalidate", Scope.ADMIN),
    ("GET", "/api/v1/some/future/endpoint", Scope.READ),
    ("PUT", "/anything", Scope.ADMIN),
    ("GET", "/healthz", None),
    ("GET", "/metrics", None),
    ("GET", "/openapi.json", None),
])
def test_required_scope(method: str, path: str, scope: Scope | None) -> None:
    assert required_scope(method, path) is scope


@given(st.sampled_from(["POST", "PUT", "PATCH", "DELETE"]), st.text(alphabet="abc/-_", max_size=30))
def test_every_write_but_ingest_needs_admin(method: str, tail: str) -> None:
    path = "/api/v1/" + tail
    expected = Scope.INGEST if (method, path) == ("POST", "/api/v1/events") else Scope.ADMIN
    if method == "POST" and re.fullmatch(r"/api/v1/meters/[^/]+/query", path):
        expected = Scope.READ
    assert required_scope(method, path) is expected


def test_parse_scopes() -> None:
    assert parse_scopes("ingest, READ,read") == {Scope.INGEST, Scope.READ}
    for bad in ("", "write", "portal", ","):
        with pytest.raises(ValueError):
            parse_scopes(bad)


def test_satisfies_and_portal() -> None:
    ingest_only = Principal("acme", frozenset({Scope.INGEST}), key_id="k")
    assert ingest_only.satisfies(Scope.INGEST)
    assert not ingest_only.satisfies(Scope.READ) and not ingest_only.satisfies(Scope.ADMIN)
    assert not ingest_only.satisfies(Scope.PORTAL)
    reader = Principal("acme", frozenset({Scope.READ}))
    assert reader.satisfies(Scope.PORTAL) and not reader.satisfies(Scope.ADMIN)
    admin = Principal("acme", frozenset({Scope.ADMIN}))
    assert not admin.satisfies(Scope.INGEST)
    assert Principal("acme", KEY_SCOPES).rate_key == "acme/local"


def test_namespace_names() -> None:
    assert check_namespace("acme-1_x") == "acme-1_x"
    for bad in ("", "Acme", "-a", "a b", "a" * 64, "a/b"):
        with pytest.raises(ValueError):
            check_namespace(bad)


def test_keys_are_high_entropy_and_parse() -> None:
    seen = set()
    for _ in range(200):
        key_id, key = generate_key()
        assert key_id_of(key) == key_id
        assert len(key) == len("mlk_") + 16 + 1 + 43
        seen.add(key)
    assert len(seen) == 200
    _, key = generate_key()
    for bad in ("", key[:-1], key + "x", key.replace("mlk_", "mlx_"), "Bearer " + key, key.upper()):
        assert key_id_of(bad) is None


def test_hash_is_hmac_sha256_under_the_secret() -> None:
    secret = b"s" * 32
    _, key = generate_key()
    oracle = hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()
    assert key_hash(secret, key) == oracle
    assert hash_matches(secret, key, oracle)
    assert not hash_matches(b"t" * 32, key, oracle)  # another server secret
    _, other = generate_key()
    assert not hash_matches(secret, other, oracle)


@pytest.mark.parametrize(("text", "delta"), [
    ("30d", timedelta(days=30)), ("12h", timedelta(hours=12)), ("90m", timedelta(minutes=90)),
    ("2w", timedelta(weeks=2)),
])
def test_expiry_durations(text: str, delta: timedelta) -> None:
    assert parse_expiry(text, NOW) == NOW + delta


def test_expiry_instants() -> None:
    assert parse_expiry("2027-01-01T00:00:00Z", NOW) == datetime(2027, 1, 1, tzinfo=UTC)
    assert parse_expiry("2027-01-01T01:00:00+01:00", NOW) == datetime(2027, 1, 1, tzinfo=UTC)
    for bad in ("2027-01-01T00:00:00", "2020-01-01T00:00:00Z", "0d", "soon", "5y"):
        with pytest.raises(ValueError, match="expires"):
            parse_expiry(bad, NOW)


def test_usable_status() -> None:
    key = ApiKey("k", "acme", frozenset({Scope.READ}), "h", "", NOW, expires_at=NOW + timedelta(hours=1))
    assert key.usable(NOW) and key.status(NOW) == "active"
    later = NOW + timedelta(hours=1)
    assert not key.usable(later) and key.status(later) == "expired"
    revoked = ApiKey("k", "acme", frozenset({Scope.READ}), "h", "", NOW, revoked_at=NOW + timedelta(minutes=1))
    assert revoked.usable(NOW)
    assert not revoked.usable(NOW + timedelta(minutes=1)) and revoked.status(NOW + timedelta(minutes=2)) == "revoked"


@given(st.text(max_size=8), st.text(max_size=8), st.text(max_size=8), st.text(max_size=8),
       st.sampled_from(["default", "acme", "a"]), st.sampled_from(["default", "acme", "b"]))
def test_dedupe_keys_never_cross_namespaces(s1: str, i1: str, s2: str, i2: str, n1: str, n2: str) -> None:
    from meterline.core.positions import dedupe_key

    same = (s1, i1, n1) == (s2, i2, n2)
    assert (dedupe_key(s1, i1, n1) == dedupe_key(s2, i2, n2)) == same


def test_default_namespace_keeps_the_keys_stored_before_namespaces() -> None:
    from meterline.core.positions import dedupe_key

    s, i = b"chat-app", b"00001"
    before = hashlib.blake2b(len(s).to_bytes(4, "big") + s + len(i).to_bytes(4, "big") + i, digest_size=16).digest()
    assert dedupe_key("chat-app", "00001") == dedupe_key("chat-app", "00001", "default") == before
    assert dedupe_key("chat-app", "00001", "acme") != before
