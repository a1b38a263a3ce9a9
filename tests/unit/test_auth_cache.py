"""The authenticator's memory of verified keys (meterline.adapters.auth) keeps every decision the
uncached check takes: revocation and expiry as soon as a reload shows them, a wrong secret under a known
key id refused, each reload re-verified, and a bounded memory.

Oracle: the uncached rule written out in the test -- a key is accepted iff its id is in the current
view, HMAC(secret, key) equals the stored hash and the stored row is usable now.
"""

from __future__ import annotations

import dataclasses
import hmac
from datetime import UTC, datetime, timedelta

import pytest

from meterline.adapters import auth as auth_module
from meterline.adapters.auth import Authenticator, AuthError
from meterline.adapters.reloading import ReloadingView
from meterline.core.access import Scope
from meterline.core.keys import ApiKey, generate_key, key_hash
from meterline.settings import Settings

SECRET = "s" * 40


class Table:
    """A stand-in for `api_keys`: what the next reload returns (fresh row objects, as ClickHouse would)."""

    def __init__(self) -> None:
        self.rows: dict[str, ApiKey] = {}

    def load(self) -> dict[str, ApiKey]:
        return {k: dataclasses.replace(v) for k, v in self.rows.items()}


def _authenticator(table: Table) -> Authenticator:
    auth = Authenticator(Settings(auth_secret=SECRET))
    auth.keys = ReloadingView(table.load, interval=3600, name="keys", min_gap=0)
    return auth


def _key(namespace: str = "acme") -> tuple[str, ApiKey]:
    key_id, key = generate_key()
    return key, ApiKey(key_id, namespace, frozenset({Scope.INGEST}), key_hash(SECRET.encode(), key), "t",
                       datetime.now(UTC) - timedelta(minutes=1))


def _oracle(table_view: dict[str, ApiKey], key: str) -> str | None:
    """The namespace the uncached rule accepts `key` in, or None."""
    key_id = key.split("_")[1] if key.count("_") >= 2 else ""
    row = table_view.get(key_id)
    digest = hmac.new(SECRET.encode(), key.encode(), "sha256").hexdigest()
    if row is None or not hmac.compare_digest(digest, row.key_hash) or not row.usable(datetime.now(UTC)):
        return None
    return row.namespace


async def _decide(auth: Authenticator, key: str) -> str | None:
    try:
        return (await auth.authenticate(f"Bearer {key}")).namespace
    except AuthError as exc:
        assert exc.status == 401
        return None


async def test_cached_decisions_follow_every_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    table = Table()
    good, row = _key("acme")
    other, other_row = _key("beta")
    forged = good[: -5] + ("AAAAA" if not good.endswith("AAAAA") else "BBBBB")  # same key id, wrong secret
    table.rows = {row.key_id: row, other_row.key_id: other_row}
    auth = _authenticator(table)
    hashes = 0
    real = auth_module.hash_matches

    def counting(secret: bytes, key: str, stored: str) -> bool:
        nonlocal hashes
        hashes += 1
        return real(secret, key, stored)

    monkeypatch.setattr(auth_module, "hash_matches", counting)
    await auth.keys.refresh()  # type: ignore[union-attr]
    steps = [
        lambda: None,
        lambda: table.rows.update({row.key_id: dataclasses.replace(row, revoked_at=datetime.now(UTC))}),
        lambda: table.rows.update({row.key_id: row}),  # (not something the CLI does; the view decides)
        lambda: table.rows.update({other_row.key_id: dataclasses.replace(
            other_row, expires_at=datetime.now(UTC) - timedelta(seconds=1))}),
        lambda: table.rows.pop(row.key_id),
    ]
    for change in steps:
        change()
        await auth.keys.refresh()  # type: ignore[union-attr]
        view = auth.keys.value or {}  # type: ignore[union-attr]
        for key in (good, other, forged, good, other, forged):  # twice: the second answer may come from memory
            assert await _decide(auth, key) == _oracle(view, key), (key, change)
    # Within one view a key is hashed once, however often it is presented.
    before = hashes
    for _ in range(50):
        await _decide(auth, other)
    assert hashes - before <= 1


async def test_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth_module, "VERIFIED_CACHE_SIZE", 8)
    table = Table()
    keys = [_key() for _ in range(20)]
    table.rows = {r.key_id: r for _, r in keys}
    auth = _authenticator(table)
    await auth.keys.refresh()  # type: ignore[union-attr]
    for key, _ in keys:
        assert await _decide(auth, key) == "acme"
        assert len(auth._verified) <= 8
