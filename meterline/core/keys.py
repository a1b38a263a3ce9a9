"""API keys: their format, how they are hashed, and when a stored key is usable.

A key is `mlk_<key_id>_<secret>`: `key_id` (16 hex digits) is public (listed, revoked by it, found in
logs); `secret` is 32 random bytes (256 bits, base64url). Only `HMAC-SHA256(server_secret, key)` is
stored, compared in constant time.

Why a fast keyed hash rather than argon2/scrypt: slow hashes protect *low-entropy* passwords from
offline guessing. A 256-bit random secret cannot be guessed whatever the hash speed, so a slow hash
would only add milliseconds to every request (the target is < 5% auth overhead on ingest). The HMAC key
(the server secret, kept outside ClickHouse) means a leaked `api_keys` table alone does not even let
anyone test a candidate key. This is the scheme GitHub and Stripe-style tokens rely on: high-entropy
tokens, a fast digest, a lookup id so verification is one hash and one constant-time compare.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from meterline.core.access import Scope

PREFIX = "mlk_"
_KEY = re.compile(r"^mlk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_DURATION = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def generate_key() -> tuple[str, str]:
    """A fresh `(key_id, key)`; the key is shown once and never stored."""
    key_id = secrets.token_hex(8)
    return key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The key id of a well-formed key, else None (malformed keys are refused before any lookup)."""
    match = _KEY.match(key)
    return match.group(1) if match else None


def key_hash(server_secret: bytes, key: str) -> str:
    """Hex HMAC-SHA256 of the whole key under the server secret: what `api_keys.key_hash` holds."""
    return hmac.new(server_secret, key.encode(), hashlib.sha256).hexdigest()


def hash_matches(server_secret: bytes, key: str, stored: str) -> bool:
    """Constant-time comparison of a presented key with a stored hash."""
    return hmac.compare_digest(key_hash(server_secret, key), stored)


def parse_expiry(text: str, now: datetime) -> datetime:
    """`30d`, `12h`, `90m`, `2w` from `now`, or an RFC 3339 instant with offset; must lie in the future."""
    match = _DURATION.match(text.strip())
    if match:
        expires = now + timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    else:
        try:
            expires = datetime.fromisoformat(text.strip())
        except ValueError:
            raise ValueError(f"expires: {text!r} is neither a duration (30d, 12h, 90m, 2w) nor an RFC 3339 time") from None
        if expires.tzinfo is None:
            raise ValueError(f"expires: {text!r} needs a UTC offset (e.g. Z)")
    if expires <= now:
        raise ValueError(f"expires: {text!r} is not in the future")
    return expires.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One stored key (the newest version of its `api_keys` row)."""

    key_id: str
    namespace: str
    scopes: frozenset[Scope]
    key_hash: str
    name: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None

    def usable(self, now: datetime) -> bool:
        """Neither revoked nor expired at `now`."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return False
        return self.expires_at is None or now < self.expires_at

    def status(self, now: datetime) -> str:
        """`active`, `revoked` or `expired`, for listings."""
        if self.revoked_at is not None and self.revoked_at <= now:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"
