"""Consumer portal tokens (OpenMeter createPortalToken): short-lived, signed, one subject, listed meters.

A token is `mlp_<JWT>` signed HS256 (PyJWT) with a key derived from the server secret, so any process
holding the secret verifies it without a lookup; the `portal_tokens` table only lists tokens and records
invalidations, which every process reloads every few seconds. The claims bind the namespace, the one
subject and the allowed meters: a customer's browser can query its own usage and nothing else, and a
changed claim breaks the signature.

Why a derived key rather than the server secret itself: the same secret also keys API-key hashes;
separate keys per purpose mean a token signature can never double as a key hash or vice versa.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import jwt
from jwt.types import Options

PREFIX = "mlp_"
AUDIENCE = "meterline-portal"
ALGORITHM = "HS256"
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def signing_key(server_secret: bytes) -> bytes:
    """The HS256 key for portal tokens, derived from (never equal to) the server secret."""
    return hmac.new(server_secret, b"meterline portal token signing v1", hashlib.sha256).digest()


def new_token_id(now: datetime) -> str:
    """A ULID (OpenMeter's id format): 48-bit milliseconds then 80 random bits, Crockford base32."""
    value = (int(now.timestamp() * 1000) << 80) | secrets.randbits(80)
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


@dataclass(frozen=True, slots=True)
class PortalClaims:
    """What a portal token grants: `subject`'s usage of `meters` (empty = every meter) in `namespace`."""

    id: str
    namespace: str
    subject: str
    meters: tuple[str, ...]
    created_at: datetime
    expires_at: datetime

    def allows_meter(self, slug: str) -> bool:
        return not self.meters or slug in self.meters


def sign(claims: PortalClaims, key: bytes) -> str:
    """The token text: `mlp_` + a compact JWS of the claims."""
    payload = {
        "aud": AUDIENCE,
        "jti": claims.id,
        "ns": claims.namespace,
        "sub": claims.subject,
        "meters": list(claims.meters),
        "iat": int(claims.created_at.timestamp()),
        "exp": int(claims.expires_at.timestamp()),
    }
    return PREFIX + jwt.encode(payload, key, algorithm=ALGORITHM)


class InvalidPortalToken(ValueError):
    """Bad signature, wrong audience or algorithm, malformed, or expired (the message says which)."""


def verify(token: str, key: bytes, now: datetime | None = None) -> PortalClaims:
    """Check signature, audience and expiry (at `now`, default the current time) and return the claims."""
    if not token.startswith(PREFIX):
        raise InvalidPortalToken("not a portal token")
    real_clock = now is None  # with an explicit `now` (tests, replays) times are checked below instead
    options: Options = {
        "require": ["exp", "iat", "jti", "sub", "aud"], "verify_exp": real_clock, "verify_iat": real_clock,
    }
    try:
        payload = jwt.decode(token[len(PREFIX):], key, algorithms=[ALGORITHM], audience=AUDIENCE, options=options)
    except jwt.ExpiredSignatureError:
        raise InvalidPortalToken("portal token expired") from None
    except jwt.PyJWTError:
        raise InvalidPortalToken("invalid portal token") from None
    meters = payload.get("meters", [])
    namespace = payload.get("ns")
    if not isinstance(namespace, str) or not isinstance(meters, list) or not all(isinstance(m, str) for m in meters):
        raise InvalidPortalToken("invalid portal token")
    expires_at = datetime.fromtimestamp(payload["exp"], UTC)
    if now is not None and now >= expires_at:
        raise InvalidPortalToken("portal token expired")
    return PortalClaims(
        id=str(payload["jti"]), namespace=namespace, subject=str(payload["sub"]), meters=tuple(meters),
        created_at=datetime.fromtimestamp(payload["iat"], UTC), expires_at=expires_at,
    )
