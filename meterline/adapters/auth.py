"""Authentication and scope checks for every HTTP app: one ASGI middleware, so no route can forget it.

`Authorization: Bearer <key>` (as the OpenMeter SDKs send it) is verified against the `api_keys` table
(HMAC-SHA256 under the server secret, constant-time compare; see `meterline.core.keys`), then the scope
the method and path need (`meterline.core.access.required_scope`) is checked. The request then carries
its `Principal` in `request.state.principal` for handlers to scope their reads and writes.

A key verified once is remembered with the very row object of the key view it matched (bounded, per
process), so a busy key costs one dict lookup instead of an HMAC and a Principal per request; every
reload of the view replaces the row objects and so re-verifies, and usability (revoked, expired) is
still checked on every request against the current view: revocation takes effect exactly as without it.

Local mode (`auth_local_mode`, what `make run` uses) lets requests *without* a key act in a default
namespace with every scope, so the README's curl examples work on a laptop; it is logged loudly at
startup, `meterline serve` refuses it on any non-loopback address, and a request that *does* present
a key is checked exactly as without local mode (a wrong key is 401 there too).

401 and 403 answers depend only on the credential and on the method and path, never on stored data, so
they cannot reveal whether another tenant's meter, subject or event exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from clickhouse_connect.driver.client import Client
from starlette.types import ASGIApp, Receive, Scope, Send

from meterline.adapters.clickhouse import connect
from meterline.adapters.keystore import KeyStore
from meterline.adapters.limits import Limiter, LimitMiddleware
from meterline.adapters.portalstore import PortalTokenStore
from meterline.adapters.problems import problem
from meterline.adapters.reloading import ReloadingView
from meterline.core.access import KEY_SCOPES, Principal, check_namespace, required_scope
from meterline.core.access import Scope as AccessScope
from meterline.core.errors import ConfigError
from meterline.core.keys import ApiKey, hash_matches, key_id_of
from meterline.core.portal import PREFIX as PORTAL_PREFIX
from meterline.core.portal import InvalidPortalToken, signing_key
from meterline.core.portal import verify as verify_portal
from meterline.settings import Settings

log = logging.getLogger(__name__)

_BEARER = "bearer "
#: Verified presented keys remembered per process (see `Authenticator.authenticate`); past this many the
#: memory is dropped and rebuilt, so keys sprayed at the server cannot grow it without bound.
VERIFIED_CACHE_SIZE = 4096


class AuthError(Exception):
    """A request that may not proceed: 401 (no valid credential) or 403 (valid, but not allowed)."""

    def __init__(self, status: int, detail: str) -> None:
        self.status = status
        self.detail = detail
        super().__init__(detail)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, host: str) -> None:
    """Refuse to serve in a way that would expose data: raise ConfigError saying what to set.

    Keyless local mode only on loopback; anywhere else keys must be verifiable (a server secret set).
    """
    local = settings.auth_local_mode
    if local and not is_loopback(host):
        raise ConfigError(
            f"refusing to serve on {host}: auth_local_mode (keyless requests) is only allowed on a loopback "
            "address; unset METERLINE_AUTH_LOCAL_MODE and create keys with `meterline keys create`"
        )
    if not local and settings.auth_secret_bytes() is None:
        raise ConfigError(
            f"refusing to serve on {host}: no API keys can be verified; set METERLINE_AUTH_SECRET_FILE (or "
            "METERLINE_AUTH_SECRET) to the server secret, or METERLINE_AUTH_LOCAL_MODE=true on 127.0.0.1"
        )


class Authenticator:
    """Turns an Authorization header into a Principal, from a view of `api_keys` reloaded every few seconds."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.secret = settings.auth_secret_bytes()
        self.local_principal: Principal | None = None
        if settings.auth_local_mode:
            namespace = check_namespace(settings.auth_local_namespace)
            self.local_principal = Principal(namespace, KEY_SCOPES)
        self.keys: ReloadingView[dict[str, ApiKey]] | None = None
        self.invalidated: ReloadingView[frozenset[str]] | None = None
        self.portal_store: PortalTokenStore | None = None
        self.portal_key = signing_key(self.secret) if self.secret is not None else None
        self._client: Client | None = None
        # presented key -> (the stored ApiKey object it was verified against, its Principal)
        self._verified: dict[str, tuple[ApiKey, Principal]] = {}

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Authenticator]:
        """Connect to ClickHouse and keep the key view fresh while the app serves."""
        if self.local_principal is not None:
            log.warning(
                "!!! LOCAL MODE: requests without an API key act in namespace %r with every scope. "
                "Never expose this server beyond 127.0.0.1 (meterline serve refuses to). !!!",
                self.local_principal.namespace,
            )
        if self.secret is None or not self.settings.clickhouse_url:
            if self.local_principal is None:
                raise ConfigError("API keys need auth_secret(_file) and clickhouse_url; or set auth_local_mode")
            yield self  # local mode without a key store: any presented key is refused
            return
        self._client = await asyncio.to_thread(
            connect, self.settings.clickhouse_url, database=self.settings.clickhouse_database,
            topology=self.settings.clickhouse_topology,
        )
        database = self.settings.clickhouse_database
        interval = self.settings.auth_refresh_seconds
        store = KeyStore(self._client, database)
        self.portal_store = PortalTokenStore(self._client, database)
        self.keys = ReloadingView(store.all, interval=interval, name="api keys")
        self.invalidated = ReloadingView(self.portal_store.invalidated_ids, interval=interval,
                                         name="invalidated portal tokens")
        try:
            async with self.keys.running(), self.invalidated.running():
                yield self
        finally:
            await asyncio.to_thread(self._client.close)

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal of a request, or AuthError(401). Scope checks are the caller's."""
        if authorization is None:
            if self.local_principal is not None:
                return self.local_principal
            raise AuthError(401, "an API key is required: send `Authorization: Bearer <key>`")
        if authorization[:7].lower() != _BEARER:
            raise AuthError(401, "use `Authorization: Bearer <key>`")
        token = authorization[7:].strip()
        if token.startswith(PORTAL_PREFIX):
            return self._portal(token)
        if self.secret is None or self.keys is None:
            raise AuthError(401, "invalid API key")
        view = self.keys.value or {}
        verified = self._verified.get(token)
        if verified is not None and view.get(verified[0].key_id) is verified[0]:
            # Checked against this very row of the current view before: the HMAC would give the same answer.
            # A reload replaces every row object, so each reload (every auth_refresh_seconds) re-verifies.
            key, principal = verified
        else:
            key_id = key_id_of(token)
            if key_id is None:
                raise AuthError(401, "invalid API key")
            stored = view.get(key_id)
            if stored is None:  # perhaps created a moment ago: look once more (rate-limited)
                await self.keys.refresh_after_miss()
                stored = (self.keys.value or {}).get(key_id)
            if stored is None or not hash_matches(self.secret, token, stored.key_hash):
                raise AuthError(401, "invalid API key")
            key = stored
            principal = Principal(key.namespace, key.scopes, key_id=key.key_id)
            if len(self._verified) >= VERIFIED_CACHE_SIZE:
                self._verified.clear()
            self._verified[token] = (key, principal)
        now = datetime.now(UTC)
        if not key.usable(now):  # every request: a revocation or expiry holds from the moment it is seen
            raise AuthError(401, f"API key {key.key_id} is {key.status(now)}")
        return principal


    def _portal(self, token: str) -> Principal:
        """A portal token's principal: its namespace, only the portal scope, one subject, its meters."""
        if self.portal_key is None or self.invalidated is None:
            raise AuthError(401, "invalid portal token")
        try:
            claims = verify_portal(token, self.portal_key)
        except InvalidPortalToken as exc:
            raise AuthError(401, str(exc)) from None
        if claims.id in (self.invalidated.value or frozenset()):
            raise AuthError(401, "portal token invalidated")
        return Principal(claims.namespace, frozenset({AccessScope.PORTAL}), key_id=f"portal:{claims.id}",
                         subject=claims.subject, meters=frozenset(claims.meters))


class AuthMiddleware:
    """Pure ASGI middleware: authenticate, check the route's scope, publish `state.principal`."""

    def __init__(self, app: ASGIApp, authenticator: Authenticator) -> None:
        self.app = app
        self.auth = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = required_scope(scope["method"], scope["path"])
        if needed is None:
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            principal = await self.auth.authenticate(authorization)
            if not principal.satisfies(needed):
                raise AuthError(403, f"this credential lacks the {needed.value!r} scope for {scope['method']} "
                                     f"{scope['path']}")
        except AuthError as exc:
            await _refuse(exc, scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


async def _refuse(exc: AuthError, scope: Scope, receive: Receive, send: Send) -> None:
    title = "Unauthorized" if exc.status == 401 else "Forbidden"
    headers = {"WWW-Authenticate": 'Bearer realm="meterline"'} if exc.status == 401 else None
    response = problem(exc.status, title, exc.detail, instance=scope["path"], headers=headers)
    await response(scope, receive, send)


def install_auth(app: object, settings: Settings) -> Authenticator:
    """Add auth and per-key limits to a Starlette/FastAPI app; its lifespan must enter `auth.running()`.

    Call it after every other middleware is added, so authentication is the outermost layer.
    """
    from starlette.applications import Starlette

    assert isinstance(app, Starlette)
    authenticator = Authenticator(settings)
    limiter = Limiter(settings)
    app.add_middleware(LimitMiddleware, limiter=limiter)  # inside auth: limits count per principal
    app.add_middleware(AuthMiddleware, authenticator=authenticator)
    app.state.authenticator = authenticator
    app.state.limiter = limiter
    return authenticator


def principal_of(state: object) -> Principal:
    """The principal the middleware attached to `request.state` (a request can only get here through it)."""
    principal = getattr(state, "principal", None)
    assert isinstance(principal, Principal), "AuthMiddleware is not installed on this app"
    return principal


__all__ = [
    "AuthError", "AuthMiddleware", "Authenticator", "check_exposure", "install_auth", "is_loopback", "principal_of",
]
