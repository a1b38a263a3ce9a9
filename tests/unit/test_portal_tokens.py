"""Portal token signing: claims survive a round trip, any change to them or to the signature is refused."""

from __future__ import annotations

import base64
import json
import re
from datetime import UTC, datetime, timedelta

import jwt
import pytest

from meterline.core.portal import (
    PREFIX,
    InvalidPortalToken,
    PortalClaims,
    new_token_id,
    sign,
    signing_key,
    verify,
)

KEY = signing_key(b"k" * 32)
NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
CLAIMS = PortalClaims(new_token_id(NOW), "acme", "customer-1", ("tokens", "calls"), NOW, NOW + timedelta(hours=1))
ULID = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$")  # OpenMeter's PortalToken.id pattern


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_round_trip() -> None:
    token = sign(CLAIMS, KEY)
    assert token.startswith(PREFIX)
    assert verify(token, KEY, NOW) == CLAIMS
    assert verify(token, KEY, NOW).allows_meter("tokens") and not CLAIMS.allows_meter("other")


def test_ids_are_ulids_ordered_by_time() -> None:
    ids = [new_token_id(NOW + timedelta(milliseconds=i)) for i in range(50)]
    assert all(ULID.match(i) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 50


def test_expired_refused() -> None:
    token = sign(CLAIMS, KEY)
    with pytest.raises(InvalidPortalToken, match="expired"):
        verify(token, KEY, CLAIMS.expires_at)
    real_now = datetime.now(UTC)
    past = PortalClaims("x", "acme", "s", (), real_now - timedelta(hours=2), real_now - timedelta(hours=1))
    with pytest.raises(InvalidPortalToken, match="expired"):
        verify(sign(past, KEY), KEY)  # against the real clock


def test_tampering_refused() -> None:
    token = sign(CLAIMS, KEY)
    header, payload, signature = token[len(PREFIX):].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = []
    for change in ({"sub": "customer-2"}, {"ns": "other"}, {"meters": []}, {"exp": claims["exp"] + 3600}):
        forged.append(f"{PREFIX}{header}.{_b64({**claims, **change})}.{signature}")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    forged.append(f"{PREFIX}{header}.{payload}.{flipped}")
    forged.append(PREFIX + jwt.encode(claims, signing_key(b"x" * 32), algorithm="HS256"))  # another secret
    forged.append(f"{PREFIX}{_b64({'alg': 'none', 'typ': 'JWT'})}.{payload}.")  # alg=none
    forged.append(PREFIX + jwt.encode({**claims, "aud": "other"}, KEY, algorithm="HS256"))  # another audience
    forged.append(PREFIX + jwt.encode({k: v for k, v in claims.items() if k != "jti"}, KEY, algorithm="HS256"))
    forged.append(token[len(PREFIX):])  # no prefix
    forged.append(PREFIX + "garbage")
    for bad in forged:
        with pytest.raises(InvalidPortalToken):
            verify(bad, KEY, NOW)


def test_signing_key_is_not_the_secret() -> None:
    assert signing_key(b"k" * 32) != b"k" * 32 and len(KEY) == 32
