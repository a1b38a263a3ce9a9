"""What the auth-on figures share: a real API key in a stack's database, and limits high enough that
the limiter runs on every request without ever refusing one (the figures measure its cost, not its effect).

The auth-off side is the same server in local mode without a key: the request skips key verification and
the limiter. The auth-on side presents a key, so each request pays the Authorization parse, the HMAC and
constant-time compare, the scope check and the limiter's counters.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from meterline.adapters.clickhouse import connect
from meterline.adapters.keystore import KeyStore
from meterline.core.access import Scope
from meterline.core.keys import ApiKey, generate_key, key_hash

#: Limits no bench load reaches, so the limiter counts but never refuses.
UNLIMITED_ENV = {
    "METERLINE_RATE_LIMIT_REQUESTS": "100000000/second",
    "METERLINE_RATE_LIMIT_EVENTS": "100000000000/second",
    "METERLINE_MAX_CONCURRENT_REQUESTS": "100000",
}


def create_key(clickhouse_url: str, database: str, secret_file: Path, namespace: str = "default") -> str:
    """A key with ingest and read scopes in `namespace`, stored as the `keys create` command would."""
    secret = secret_file.read_text().strip().encode()
    key_id, key = generate_key()
    client = connect(clickhouse_url)
    try:
        KeyStore(client, database).add(ApiKey(key_id, namespace, frozenset({Scope.INGEST, Scope.READ}),
                                              key_hash(secret, key), "bench", datetime.now(UTC)))
    finally:
        client.close()
    return key
