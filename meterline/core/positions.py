"""Where an event sits in the log, and the key that identifies it for dedupe.

Pure and shared: the live processor (`processor.dedupe`), the row builder (`meterline.core.rows`) and the
offline jobs all decide first sightings by these two values, so they must compute them identically.
"""

from __future__ import annotations

import hashlib
from typing import NamedTuple


class Position(NamedTuple):
    """Where an event sits in the log; unique per event for the life of a broker log (epoch)."""

    log_epoch: str
    partition: int
    offset: int
    index: int  # type: ignore[assignment]  # the design's name; shadows tuple.index, never called here


def dedupe_key(source: str, event_id: str) -> bytes:
    """blake2b-128 of `source NUL id`: CloudEvents identity is (source, id), NUL cannot occur in either."""
    return hashlib.blake2b(f"{source}\x00{event_id}".encode(), digest_size=16).digest()
