"""Where an event sits in the log, the key that identifies it for dedupe, and which of two stored copies
of one key counts.

Pure and shared: the live processor (`processor.dedupe`), the row builder (`meterline.core.rows`) and the
offline jobs all decide first sightings by these values, so they must compute them identically.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Final, NamedTuple

from meterline.core.access import DEFAULT_NAMESPACE

#: Version of `dedupe_key`'s input encoding. Keys of different versions never match, so anything that
#: caches keys (the processor's RocksDB state) records the version it was built with and rebuilds from
#: ClickHouse's stored `(source, id)` when it differs (processor/dedupe.py). Version 1 hashed
#: `source NUL id`, which let `("a\0b", "c")` and `("a", "b\0c")` collide; version 2 length-prefixes.
KEY_VERSION: Final = 2


class Position(NamedTuple):
    """Where an event sits in the log; unique per event for the life of a broker log (epoch)."""

    log_epoch: str
    partition: int
    offset: int
    index: int  # type: ignore[assignment]  # the design's name; shadows tuple.index, never called here


class Sighting(NamedTuple):
    """A stored copy of a key: its broker time (unix seconds, as `dedupe_keys.seen_at` and the processor's
    cache record it) and its position. Fields in the order copies are ranked (`first_sighting`)."""

    seen: int
    log_epoch: str
    partition: int
    offset: int
    index: int  # type: ignore[assignment]  # as in Position


def first_sighting(a: Sighting, b: Sighting) -> Sighting:
    """Which of two stored copies of one key counts: the one with the smaller (broker time, log epoch,
    partition, offset, index).

    Why a rule at all: two workers that decide copies of one key on partitions they each own before
    either copy is written both accept theirs (neither could see the other). Once both are stored, every
    worker that meets the two must agree, without talking to the others, on which copy stays: a total
    order on what the log and the tables say about each copy gives the same answer to all of them, to a
    replay and to a restarted worker. The broker time comes first so that the copy sent first wins where
    the clocks tell; the rest only breaks ties (seconds are coarse) and makes the order total. With more
    than two copies the smallest wins and every other copy loses to it, in any order of meeting them.
    """
    return min(a, b)


def dedupe_key(source: str, event_id: str, namespace: str = DEFAULT_NAMESPACE) -> bytes:
    """blake2b-128 of the length-prefixed UTF-8 of `source` then `id`: CloudEvents identity is (source, id),
    within a namespace: one tenant can never make another tenant's event a duplicate.

    Why length prefixes: any separator byte can occur inside a string a foreign producer puts on the
    topic, and then two different pairs hash the same input. With each part preceded by its byte length
    the encoding is injective whatever the strings hold (ingest also refuses control characters).

    The default namespace hashes `(source, id)` alone, exactly as before namespaces existed, so stored
    keys and worker caches stay valid; any other namespace is hashed in as a third length-prefixed part
    in front. The two encodings never collide: equal first prefixes force equal first parts, equal
    second prefixes equal second parts, and then the three-part input is the longer one.
    """
    return _digest(_head(source, namespace), event_id)


def _prefixed(text: str) -> bytes:
    b = text.encode()
    return len(b).to_bytes(4, "big") + b


def _head(source: str, namespace: str) -> bytes:
    """What a key's input holds before the id: the namespace's part (none for the default one), the source's."""
    return _prefixed(source) if namespace == DEFAULT_NAMESPACE else _prefixed(namespace) + _prefixed(source)


def _digest(head: bytes, event_id: str) -> bytes:
    return hashlib.blake2b(head + _prefixed(event_id), digest_size=16).digest()


def message_keys(events: Iterable[Mapping[str, Any]], namespace: str = DEFAULT_NAMESPACE) -> list[bytes]:
    """`dedupe_key` of each event's `(source, id)`, for the events of one message: each distinct source's
    part of the input is built once (a message's events nearly always share one source), ~0.13 µs an
    event less in the worker. Raises what `dedupe_key` (or reading `source` and `id`) raises for the first
    event it cannot take."""
    heads: dict[str, bytes] = {}
    blake2b = hashlib.blake2b
    out: list[bytes] = []
    for event in events:
        source = event["source"]
        head = heads.get(source)
        if head is None:
            head = heads[source] = _head(source, namespace)
        i = event["id"].encode()  # `_digest`, inline: a call an event is what this saves
        out.append(blake2b(head + len(i).to_bytes(4, "big") + i, digest_size=16).digest())
    return out
