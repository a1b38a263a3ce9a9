"""How far each owned partition is written: consumer lag and the age of the oldest unprocessed message.

Why these two gauges: retention deletes what was never processed, and a month-end invoice run must know
whether it reads complete data. Lag (messages in the log not yet written) says how much is waiting; the
oldest-unprocessed age says for how long, which is what an alert compares with retention. Both are per
partition (one stuck partition hides behind healthy totals).

The age is an upper bound: the oldest unprocessed message is the one after the last written one, so it
is at most `now - broker timestamp of the last written message` old; before a partition's first write
since its assignment it is the time since the assignment. End offsets come from the broker (Faust's
`highwaters`); the local tansu broker under-reports them for multi-record batches, so the worker also
counts what it fetched but has not written (its fetch position): locally lag then covers that part only.

The same numbers give each partition's `complete_until`, stored in ClickHouse (`partition_progress`):
the instant before which every message the broker acknowledged is written. A query answer's
`completeUntil` is the minimum over all partitions (query/routes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from processor import metrics


@dataclass
class PartitionProgress:
    """What is written of one partition since it was assigned to this worker."""

    assigned_at: float
    next_offset: int | None = None  # every offset below is written
    last_written_time: float | None = None  # broker timestamp of the last written message


def lag_and_age(end_offset: int, progress: PartitionProgress, now: float) -> tuple[int | None, float]:
    """(messages not yet written or None while unknown, upper bound of the oldest one's age in seconds)."""
    if progress.next_offset is None:
        return None, (now - progress.assigned_at) if end_offset > 0 else 0.0
    lag = max(0, end_offset - progress.next_offset)
    if lag == 0:
        return 0, 0.0
    since = progress.last_written_time if progress.last_written_time is not None else progress.assigned_at
    return lag, max(0.0, now - since)


class Progress:
    """Per-partition progress of one worker, exported as Prometheus gauges labelled by partition."""

    def __init__(self) -> None:
        self.partitions: dict[int, PartitionProgress] = {}

    def assigned(self, partitions: set[int], now: float) -> None:
        for p in partitions:
            self.partitions.setdefault(p, PartitionProgress(assigned_at=now))

    def revoked(self, partitions: set[int]) -> None:
        """Stop reporting partitions another worker owns now (their gauges would go stale)."""
        for p in partitions:
            if self.partitions.pop(p, None) is not None:
                for gauge in (metrics.PROCESSED_OFFSET, metrics.LAG, metrics.OLDEST_UNPROCESSED_AGE):
                    try:
                        gauge.remove(str(p))
                    except KeyError:
                        pass

    def written(self, partition: int, next_offset: int, broker_time: float | None, now: float) -> None:
        """After the rows of every message of `partition` below `next_offset` are stored."""
        progress = self.partitions.setdefault(partition, PartitionProgress(assigned_at=now))
        if progress.next_offset is None or next_offset > progress.next_offset:
            progress.next_offset = next_offset
            if broker_time is not None:
                progress.last_written_time = broker_time
        metrics.PROCESSED_OFFSET.labels(str(partition)).set(progress.next_offset)

    def observe(self, end_offsets: dict[int, int], now: float, asked_at: float | None = None,
                broker_ends: dict[int, int] | None = None) -> dict[int, tuple[int, float]]:
        """Update the lag and age gauges from the end offsets of the owned partitions (the broker's, raised
        to the fetch position).

        Returns, per partition with something written, `(next_offset, complete_until)`: the instant before
        which every message the broker acknowledged is written. Caught up with the broker's end offsets
        asked for at `asked_at`, that is `asked_at`. Otherwise -- behind, or a broker whose end offset is
        below what is already written (the local tansu broker) and so cannot say what it acknowledged --
        it is the broker time of the last written message: true, if conservative for an idle partition.
        """
        out: dict[int, tuple[int, float]] = {}
        for p, end in end_offsets.items():
            progress = self.partitions.get(p)
            if progress is None:
                continue
            lag, age = lag_and_age(end, progress, now)
            if lag is not None:
                metrics.LAG.labels(str(p)).set(lag)
            metrics.OLDEST_UNPROCESSED_AGE.labels(str(p)).set(age)
            if progress.next_offset is None:
                continue
            trusted = broker_ends is None or broker_ends.get(p, 0) >= progress.next_offset
            if lag == 0 and trusted:
                out[p] = (progress.next_offset, asked_at if asked_at is not None else now)
            elif progress.last_written_time is not None:
                out[p] = (progress.next_offset, progress.last_written_time)
        return out
