"""processor/progress.py: per-partition lag and oldest-unprocessed age, as an alert would read them."""

from __future__ import annotations

from prometheus_client import REGISTRY

from processor.progress import PartitionProgress, Progress, lag_and_age


def sample(name: str, partition: int) -> float | None:
    return REGISTRY.get_sample_value(name, {"partition": str(partition)})


def test_lag_and_age_rules() -> None:
    fresh = PartitionProgress(assigned_at=100.0)
    assert lag_and_age(0, fresh, 130.0) == (None, 0.0)  # empty partition, nothing written yet
    assert lag_and_age(5, fresh, 130.0) == (None, 30.0)  # stuck before the first write: since assignment
    written = PartitionProgress(assigned_at=100.0, next_offset=40, last_written_time=110.0)
    assert lag_and_age(40, written, 500.0) == (0, 0.0)  # caught up: nothing is waiting
    assert lag_and_age(45, written, 500.0) == (5, 390.0)  # waiting since after the last written message
    assert lag_and_age(39, written, 500.0) == (0, 0.0)  # a stale end offset never makes lag negative


def test_gauges_follow_writes_and_revokes() -> None:
    progress = Progress()
    progress.assigned({70, 71}, now=1000.0)
    progress.written(70, 11, broker_time=1010.0, now=1020.0)
    progress.written(70, 9, broker_time=1005.0, now=1021.0)  # an older batch finishing late never goes back
    progress.observe({70: 15, 71: 0}, now=1100.0)
    assert sample("meterline_processor_processed_offset", 70) == 11
    assert sample("meterline_processor_lag_messages", 70) == 4
    assert sample("meterline_processor_oldest_unprocessed_age_seconds", 70) == 90.0
    assert sample("meterline_processor_oldest_unprocessed_age_seconds", 71) == 0.0
    progress.revoked({70})
    assert sample("meterline_processor_lag_messages", 70) is None  # another worker reports it now
    progress.observe({70: 20}, now=1200.0)
    assert sample("meterline_processor_lag_messages", 70) is None


def test_complete_until_is_only_ever_a_true_instant() -> None:
    progress = Progress()
    progress.assigned({80, 81, 82, 83}, now=1000.0)
    progress.written(80, 10, broker_time=1050.0, now=1060.0)
    progress.written(81, 10, broker_time=1055.0, now=1060.0)
    progress.written(82, 10, broker_time=1040.0, now=1060.0)
    broker = {80: 10, 81: 12, 82: 1, 83: 4}  # 82: a broker under-reporting its end (tansu); 83: nothing written
    ends = {80: 10, 81: 12, 82: 10, 83: 4}
    complete = progress.observe(ends, now=1100.0, asked_at=1099.0, broker_ends=broker)
    assert complete == {
        80: (10, 1099.0),  # caught up with the broker's end as of asked_at
        81: (10, 1055.0),  # behind: only what the last written message's broker time vouches for
        82: (10, 1040.0),  # the broker's end cannot be trusted: same
    }  # 83: nothing written yet, no claim
