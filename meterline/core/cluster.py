"""The query settings that keep writes idempotent and reads exact on a ClickHouse cluster.

Why each one (docs/design.md, "ClickHouse cluster mode"):

* `insert_deduplication_token`: a retried batch (the insert timed out after some shards or replicas
  applied it) carries the same token, so every replica drops the blocks it already has instead of
  relying on the data hash. The token is derived from the batch's message positions *and* a digest of
  everything else that shapes its rows (`salt`: meters, their generations and row options), because a token that matches
  drops the block whatever its data: after a config change the same positions produce other rows,
  which must not be dropped.
* `insert_quorum='auto'` (a majority of the shard's replicas): an acked batch is on a majority, so a
  worker that takes over a partition and loads its dedupe keys with `select_sequential_consistency`
  sees every acknowledged first sighting. Reading a lagging replica instead would miss a key, and a
  later retry of that event would be counted twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from meterline.core.schema import Topology

# A batch's position set: (log_epoch, kafka_partition, kafka_offset) of each message with rows.
MessagePosition = tuple[str, int, int]


def insert_token(table: str, positions: Iterable[MessagePosition], salt: str = "") -> str:
    """Deterministic insert_deduplication_token of one table's insert of one batch.

    Order-independent (positions are sorted) and injective enough: blake2b-128 over length-prefixed
    fields, so two different batches never share a token by concatenation accident.
    """
    digest = hashlib.blake2b(digest_size=16)
    for part in (table, salt):
        data = part.encode()
        digest.update(len(data).to_bytes(4, "big") + data)
    for epoch, partition, offset in sorted(set(positions)):
        data = epoch.encode()
        digest.update(len(data).to_bytes(4, "big") + data + partition.to_bytes(4, "big") + offset.to_bytes(8, "big"))
    return f"{table}:{digest.hexdigest()}"


def insert_settings(topology: Topology, token: str | None) -> dict[str, object]:
    """Settings of one processor insert (beyond `async_insert=0`) for this topology."""
    if topology.cluster is None:
        return {}
    settings: dict[str, object] = {"insert_deduplicate": 1}
    if token is not None:
        settings["insert_deduplication_token"] = token
    if topology.replicated:
        settings["insert_quorum"] = "auto"
    return settings


def exact_read_settings(topology: Topology) -> dict[str, object]:
    """Settings of a read that must see every acknowledged write (the dedupe-state load)."""
    if topology.cluster is not None and topology.replicated:
        return {"select_sequential_consistency": 1}
    return {}
