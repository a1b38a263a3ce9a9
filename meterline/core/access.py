"""Who may call what: scopes, the principal a request acts as, and the scope each route needs.

Why the rule is a function of method and path alone: the decision is taken before any handler runs
(one ASGI middleware, `meterline.adapters.auth`), so a route added later cannot forget it, and a 401 or
403 can never depend on stored data, so it never reveals whether another tenant's meter, subject or
event exists. Unknown paths are not public: anything under the API that is not a read is `admin`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum


class Scope(str, Enum):
    """What a key may do. Scopes do not imply each other: `admin` alone cannot ingest or read."""

    INGEST = "ingest"  # POST /api/v1/events only: services that emit usage
    READ = "read"  # meter queries, subjects, raw events, dead letters: analysts, billing jobs
    ADMIN = "admin"  # meters, keys, portal tokens: operators
    PORTAL = "portal"  # a portal token: one subject's query of the meters it lists (never on a key)


#: The namespace of keyless local mode and of every row written before namespaces existed.
DEFAULT_NAMESPACE = "default"

KEY_SCOPES: frozenset[Scope] = frozenset({Scope.INGEST, Scope.READ, Scope.ADMIN})

#: Paths any caller may use: probes, metrics (no tenant data) and the API description.
PUBLIC_PATHS: frozenset[str] = frozenset(
    {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
)
PORTAL_QUERY = re.compile(r"^/api/v1/portal/meters/[^/]+/query$")
#: OpenMeter's queryMeterPost: a read that carries its parameters in a JSON body.
METER_QUERY_POST = re.compile(r"^/api/v1/meters/[^/]+/query$")
PORTAL_TOKENS_PREFIX = "/api/v1/portal/tokens"
NAMESPACE_PATTERN = re.compile(r"^[a-z0-9](?:[a-z0-9_-]{0,62})$")
_READ_METHODS = frozenset({"GET", "HEAD"})


def required_scope(method: str, path: str) -> Scope | None:
    """The scope a request needs, or None for a public path.

    A portal query also accepts a `read` key (the caller of `satisfies` decides); portal token
    management is `admin` because a token hands data of a subject to whoever holds it.
    """
    if path in PUBLIC_PATHS:
        return None
    method = method.upper()
    if path == "/api/v1/events" and method == "POST":
        return Scope.INGEST
    if PORTAL_QUERY.match(path) and method in _READ_METHODS:
        return Scope.PORTAL
    if path.startswith(PORTAL_TOKENS_PREFIX):
        return Scope.ADMIN
    if method == "POST" and METER_QUERY_POST.match(path):
        return Scope.READ
    return Scope.READ if method in _READ_METHODS else Scope.ADMIN


def parse_scopes(text: str) -> frozenset[Scope]:
    """`ingest,read` -> {INGEST, READ}; raises ValueError naming an unknown or missing scope."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("at least one scope is required: ingest, read, admin")
    scopes = set()
    for name in names:
        try:
            scope = Scope(name)
        except ValueError:
            raise ValueError(f"unknown scope {name!r}: use ingest, read, admin") from None
        if scope not in KEY_SCOPES:
            raise ValueError(f"scope {name!r} cannot be given to a key")
        scopes.add(scope)
    return frozenset(scopes)


def check_namespace(namespace: str) -> str:
    """Return `namespace` if it is a valid name (lower-case letters, digits, `_`, `-`; <= 63), else raise."""
    if not NAMESPACE_PATTERN.match(namespace):
        raise ValueError(f"invalid namespace {namespace!r}: use 1-63 of a-z, 0-9, '_' and '-', starting alphanumeric")
    return namespace


@dataclass(frozen=True, slots=True)
class Principal:
    """What a request acts as: a namespace and what it may do there.

    `key_id` is None in local mode (keyless requests on loopback). A portal principal also carries the
    one subject and the meters its token was minted for (empty = every meter).
    """

    namespace: str
    scopes: frozenset[Scope]
    key_id: str | None = None
    subject: str | None = None
    meters: frozenset[str] = frozenset()

    def satisfies(self, needed: Scope) -> bool:
        """Whether this principal may make a request that needs `needed`."""
        if needed in self.scopes:
            return True
        return needed is Scope.PORTAL and Scope.READ in self.scopes

    #: The identity that rate and concurrency limits count against (computed once: read on every request).
    rate_key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate_key", f"{self.namespace}/{self.key_id or 'local'}")
