"""First-sighting dedupe state: which position first carried each (source, id).

Why first-sighting positions rather than a "seen" set: a worker that crashes after writing to ClickHouse
but before committing its Kafka offsets replays the same messages. A plain "seen" set would then drop the
replayed originals as duplicates and their rows would never be rewritten (harmless) -- but it would also
drop them when the *write* was what got lost. Remembering *where* a key was first seen makes every
decision a pure function of the log: a position is accepted iff it is the recorded first sighting, so
replaying any suffix of the log reproduces exactly the same accept/drop decisions (docs/design.md,
"Exactly-once effect").

Storage: ClickHouse `events` is the source of truth (one row per accepted first sighting), copied to
`dedupe_keys` (ordered by position: what loads read). This module
keeps a per-worker RocksDB cache (rocksdict) so that memory stays bounded: 10M keys are ~250 MB of SST on
disk and only RocksDB's block cache and memtables live in RAM. Nothing holds a Python dict of all keys;
only the keys of the batch being processed are held in memory (`prefetch` -> `decide` -> `flush`).

Layout (raw bytes):
    b"k" + dedupe_key(16)           -> position(20) + seen_at(4)   position = >IIQI (epoch_no, partition, offset, index),
                                                                   seen_at = >I broker time of the first sighting
    b"e" + log_epoch (utf-8)         -> >I epoch_no                 small int per Kafka cluster id
    b"p" + >I partition              -> >IQ (epoch_no, next_offset) the "loaded up to" marker
    b"f" + >I partition              -> >IQ (epoch_no, next_offset) the same, of `dedupe_keys` rows merged
                                        while another worker owns the partition (`foreign_marker`)
    b"v"                             -> >I KEY_VERSION              the dedupe_key encoding the keys use
    b"b"                             -> utf-8 stamp                 the newest `dedupe_keys` backfill the foreign
                                        markers were read after (`since_backfill`)

Key version: `meterline.core.positions.dedupe_key` changed encoding once (length prefixes, v2). A cache
written with another version is deleted on open, so every partition reloads from ClickHouse's
`dedupe_keys` of the current version, whose keys were computed from the stored `(source, id)`
(processor/key_backfill.py) rather than copied from the `events.dedupe_key` column: state built after
an upgrade never mixes key versions.

Marker semantics: for partition p, marker (E, M) means the cache holds every key that ClickHouse holds for
partition p in epoch E below offset M, and every key of older epochs (within the horizon). A restart then
loads only `log_epoch = E AND kafka_offset >= M`; a different epoch (broker log reset) reloads fully.

Global per namespace: the cache is shared by all partitions of a worker and also holds the keys other
workers stored for the partitions it does not own (read from the `dedupe_keys` table before every
batch, each partition from its `foreign_marker`: `load_rows(..., owned=False)`), so a copy of an event on another
partition (a retry under another subject, a partition-count change, a message produced straight onto
any partition) is dropped like a copy on the same partition.

Conflicts: two copies decided by different workers before either was written are both stored. A load
that meets a key stored (or decided here) at another position within the horizon counts a conflict,
keeps the copy `positions.first_sighting` ranks first -- every worker meeting the two picks the same one
-- and records the other as a pending retraction, in the same RocksDB write:

    b"r" + >I loser partition + dedupe_key(16) + loser position(20) -> loser record(24) + winner record(24)

The owner of the loser's partition undoes it (meterline/core/retraction.py, `ClickHouseSink`) and then deletes the record
(`retracted`); until then the record survives a crash, and a lost cache finds the conflict again in the
stored rows (the loser's `dedupe_keys` row, what loads read, is deleted last). Since the cache now holds the winner, a replay
of the loser's message drops it, as the retraction did (docs/design.md, "Exactly-once effect").
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from rocksdict import BlockBasedOptions, IngestExternalFileOptions, Options, Rdict, SstFileWriter, WriteBatch

from meterline.core.positions import KEY_VERSION, Position, Sighting, first_sighting
from meterline.core.retraction import Loser

logger = logging.getLogger(__name__)

_POS = struct.Struct(">IIQI")
_SEEN = struct.Struct(">I")
_EPOCH_NO = struct.Struct(">I")
_MARKER = struct.Struct(">IQ")
_PARTITION = struct.Struct(">I")
_RECORD = struct.Struct(">IIQII")  # position + seen_at: what a loaded key's record holds

_KEY_PREFIX = b"k"
_EPOCH_PREFIX = b"e"
_MARKER_PREFIX = b"p"
_FOREIGN_PREFIX = b"f"
_RETRACT_PREFIX = b"r"
_VERSION_KEY = b"v"
_BACKFILL_KEY = b"b"
_DAY = 86_400
#: Rows `load_rows` writes per WriteBatch, and `load_sorted` per ingested SST file: big enough that a
#: file is ~20 MB (fewer, larger files: less for compaction to merge), small enough that a chunk's keys,
#: records and multi-get results (~0.2 KB a row in Python objects) stay well inside P5's 1 GB.
_PUT_CHUNK = 10_000
_INGEST_CHUNK = 500_000
#: Keys per multi-get of `load_sorted`: one multi-get of a whole chunk cost 1-2 us a key (Python and
#: RocksDB handling the big lists), slices of ~1k 0.2-0.4 us a key (0.8 when half are cached).
_GET_SLICE = 1024


_UNSEEN: Any = object()  # a key `prefetch` did not look up (None there: looked up, absent)


def _expired(old: bytes, new: bytes, horizon_seconds: int) -> bool:
    """Whether record `new` was first seen (broker time) more than the horizon after record `old`: then
    `old` had expired when `new` was accepted, and `new` is the sighting later copies are compared with."""
    return len(old) > 20 and len(new) > 20 and \
        _SEEN.unpack_from(old, 20)[0] < _SEEN.unpack_from(new, 20)[0] - horizon_seconds


def _retraction_key(key: bytes, loser: bytes) -> bytes:
    """Where a pending retraction is kept: by the loser's partition first, so a worker reads only the
    ones of the partitions it owns."""
    return _RETRACT_PREFIX + loser[4:8] + key + loser[:20]


def _options() -> Options:
    """The table options of the database and of the SST files loads write for it (the same filters)."""
    opts = Options(raw_mode=True)
    # Most keys a batch looks up are new, i.e. misses: without filters each one searches the memtable
    # and every SST's index. Bloom filters on both (10 bits a key: ~12 MB per 10M keys) answered a
    # batch's 20k lookups in a third of the time once 400k keys were cached (docs/performance.md).
    table = BlockBasedOptions()
    table.set_bloom_filter(10, False)
    opts.set_block_based_table_factory(table)
    return opts


def _record(record: bytes) -> bytes:
    """A record with its broker time (tests may decide without one: 0)."""
    return record if len(record) > 20 else record + _SEEN.pack(0)


class DedupeStateClosedError(RuntimeError):
    """A load tried to write after `DedupeState.close` (the worker is shutting down)."""


class DedupeState:
    """First-sighting positions of the dedupe keys of one worker, cached in RocksDB.

    Per batch: `prefetch(keys)` (a RocksDB get per key), `decide(key, position)` per event in log order,
    `flush()` before the ClickHouse write (so a crash after the write never loses a record that
    ClickHouse has), then `mark_written(partition, next_offset)` after the write succeeded.
    """

    def __init__(self, path: str, horizon_days: int = 32, *, max_lag_seconds: float = 0, sync: bool = False) -> None:
        os.makedirs(path, exist_ok=True)
        opts = _options()
        opts.create_if_missing(True)
        opts.set_write_buffer_size(32 * 1024 * 1024)
        opts.set_memtable_prefix_bloom_ratio(0.1)
        opts.set_memtable_whole_key_filtering(True)
        self._db = Rdict(path, opts)
        #: SST files of `load_sorted` are written here, then moved into the database; what a crashed
        #: process left is removed (the database's lock is held now: no other process writes here).
        self._ingest_dir = path.rstrip("/") + ".ingest"
        shutil.rmtree(self._ingest_dir, ignore_errors=True)
        self._sst_options = _options()
        self._ingest_options = IngestExternalFileOptions()
        self._ingest_options.set_move_files(True)
        version = _EPOCH_NO.pack(KEY_VERSION)
        if self._db.get(_VERSION_KEY) != version:
            # A cache of another key encoding: rebuild it from ClickHouse. (Rdict iterates items.)
            if any(True for _ in self._db.keys()):  # noqa: SIM118
                logger.warning("dedupe cache uses another key version; rebuilding it", extra={"path": path})
                self._db.close()
                Rdict.destroy(path, opts)
                self._db = Rdict(path, opts)
            self._db.put(_VERSION_KEY, version)
        self.path = path
        self.horizon_seconds = horizon_days * _DAY
        #: How long a key is kept, on the worker's clock: the horizon (judged on log time, see `decide`)
        #: plus the longest a message can wait in the log before it is processed (the topic's retention),
        #: so a worker catching up on a backlog still has every key its messages must be compared with.
        self.keep_seconds = self.horizon_seconds + max_lag_seconds
        self._epochs: dict[str, int] = {}
        self._batch: dict[bytes, bytes | None] = {}
        self._new: dict[bytes, bytes] = {}
        self._loaded: set[int] = set()
        #: Per partition, how many times it was revoked: a load that started before a revoke must not mark
        #: the partition loaded (the other owner may have written keys after the load's snapshot).
        self._generations: dict[int, int] = {}
        #: Loads run in a worker thread; `close` must not free the database under one of their writes.
        self._io = threading.Lock()
        self._closed = False
        self._sync = sync
        #: Keys found stored at two positions by a load (both copies were counted until the loser is
        #: retracted: see module doc).
        self.conflicts = 0
        next_no = 0
        for k, v in self._db.items(from_key=_EPOCH_PREFIX):
            if not k.startswith(_EPOCH_PREFIX):
                break
            no = _EPOCH_NO.unpack(v)[0]
            self._epochs[k[1:].decode()] = no
            next_no = max(next_no, no + 1)
        self._next_epoch_no = next_no

    # ------------------------------------------------------------------ epochs and markers
    def epoch_no(self, log_epoch: str) -> int:
        """The small integer standing for a Kafka cluster id inside packed positions (persisted)."""
        no = self._epochs.get(log_epoch)
        if no is None:
            no = self._next_epoch_no
            self._next_epoch_no += 1
            self._db.put(_EPOCH_PREFIX + log_epoch.encode(), _EPOCH_NO.pack(no))
            self._epochs[log_epoch] = no
        return no

    def marker(self, partition: int) -> tuple[int, int] | None:
        """(epoch_no, next_offset) up to which this partition's keys are known to be cached."""
        v = self._db.get(_MARKER_PREFIX + _PARTITION.pack(partition))
        return None if v is None else _MARKER.unpack(v)  # type: ignore[return-value]

    def _set_marker(self, partition: int, epoch_no: int, next_offset: int, prefix: bytes = _MARKER_PREFIX) -> None:
        self._db.put(prefix + _PARTITION.pack(partition), _MARKER.pack(epoch_no, next_offset))

    def foreign_marker(self, partition: int) -> tuple[int, int] | None:
        """(epoch_no, next_offset) below which the `dedupe_keys` rows of `partition` -- a partition another
        worker owns -- are merged. Kept apart from `marker`: the two advance on different reads (the tail
        before each batch, the load on assignment), and a marker must only ever claim what its read saw."""
        v = self._db.get(_FOREIGN_PREFIX + _PARTITION.pack(partition))
        return None if v is None else _MARKER.unpack(v)  # type: ignore[return-value]

    def since_backfill(self, stamp: str) -> int:
        """Drop every `foreign_marker` unless they were read after the backfill `stamp` (the newest recorded
        fill of `dedupe_keys` from `events`, processor/key_backfill.py). A backfill adds
        rows *below* positions a marker may have passed (a cache kept across the upgrade that introduced
        it), so those partitions are tailed again from the start of the kept days. Returns how many it dropped."""
        if self._db.get(_BACKFILL_KEY) == stamp.encode():
            return 0
        wb = WriteBatch(raw_mode=True)
        n = 0
        for k in self._db.keys(from_key=_FOREIGN_PREFIX):
            if not k.startswith(_FOREIGN_PREFIX):
                break
            wb.delete(k)
            n += 1
        wb.put(_BACKFILL_KEY, stamp.encode())
        self._db.write(wb)
        return n

    def is_loaded(self, partition: int) -> bool:
        """Whether this process already merged ClickHouse's keys of `partition` since it was assigned."""
        return partition in self._loaded

    def forget_partitions(self, partitions: Iterable[int]) -> None:
        """On revoke: another worker may write keys for these partitions, so reload on next assignment.

        Also invalidates a load of these partitions still in flight (see `generation`)."""
        for p in partitions:
            self._loaded.discard(p)
            self._generations[p] = self._generations.get(p, 0) + 1

    def generation(self, partition: int) -> int:
        """Pass this to `load_rows`, taken before the load starts: a revoke in between voids the load's
        "loaded" mark (its keys are still merged: they are true first sightings)."""
        return self._generations.get(partition, 0)

    def mark_written(self, log_epoch: str, partition: int, next_offset: int) -> None:
        """After a successful ClickHouse write of every message of `partition` below `next_offset`."""
        no = self.epoch_no(log_epoch)
        current = self.marker(partition)
        if current is None or current[0] != no or current[1] < next_offset:
            self._set_marker(partition, no, next_offset)

    # ------------------------------------------------------------------ loading from ClickHouse
    def load_rows(
        self, log_epoch: str, partition: int, rows: Iterable[Sequence[Any]], *, now: float | None = None,
        generation: int | None = None, owned: bool = True,
    ) -> int:
        """Merge `dedupe_keys` rows (dedupe_key, log_epoch, kafka_partition, kafka_offset, batch_index,
        seen_at unix seconds) of one partition into the cache and advance its marker.

        A cached record is never overwritten: ClickHouse and the cache agree on the first sighting of
        every key, except for rows the cache has that ClickHouse does not (written locally before a
        failed write), and those are exactly the ones a replay must still accept. A row whose key is
        cached at another position is a key stored (or about to be) twice: counted in `conflicts`.

        Runs in a thread: it raises `DedupeStateClosedError` instead of writing once `close` was called,
        and marks the partition loaded only if it was not revoked since `generation` was taken. With
        `owned=False` (`dedupe_keys` rows of another worker's partition, merged for global dedupe) it
        advances `foreign_marker` instead, and marks nothing loaded.
        """
        generation, floor, current_no = self._load_start(log_epoch, partition, generation, now)
        max_next = 0
        n = 0
        chunk: list[tuple[bytes, bytes]] = []
        for key, epoch, part, offset, index, seen in rows:
            seen_s = int(seen)
            if seen_s < floor:
                continue
            no = self._epochs.get(epoch)
            if no is None:
                with self._open():
                    no = self.epoch_no(epoch)
            part, offset = int(part), int(offset)
            if no == current_no and part == partition and offset >= max_next:
                max_next = offset + 1
            chunk.append((_KEY_PREFIX + bytes(key), _RECORD.pack(no, part, offset, int(index), seen_s)))
            n += 1
            if len(chunk) >= _PUT_CHUNK:
                self._merge_chunk(chunk)
                chunk.clear()
        if chunk:
            self._merge_chunk(chunk)
        self._loaded_up_to(partition, current_no, max_next, generation, owned)
        return n

    def load_sorted(
        self, log_epoch: str, partition: int, blocks: Iterable[Sequence[Sequence[Any]]], *,
        now: float | None = None, generation: int | None = None, owned: bool = True,
    ) -> int:
        """`load_rows` of a partition's whole history, as column blocks (the same six columns, ints as ints)
        best sorted by key (`ClickHouseSink.load_dedupe_by_key`): what a takeover loads, and (`owned=False`)
        what the first merge of another worker's partition reads.

        The same decisions, made per chunk of `_INGEST_CHUNK` rows, each written as one sorted SST file
        that RocksDB ingests whole (`_ingest`) instead of a memtable insert per key that is then flushed
        and compacted level by level. Sorted rows make one load's files disjoint and its multi-gets read
        neighbouring keys; a chunk whose keys are all new and increasing (a cold takeover's) is written
        as it is, without a Python decision per row (a reload spent ~8-17 us a key on per-key writes,
        docs/performance.md). Rows in another order are correct too, only slower (each chunk is sorted).
        """
        generation, floor, current_no = self._load_start(log_epoch, partition, generation, now)
        max_next = 0
        n = 0
        keys: list[bytes] = []
        records: list[bytes] = []
        for block in blocks:
            key_col, epoch_col, part_col, offset_col, index_col, seen_col = block
            if not key_col:
                continue
            if min(seen_col) < floor:  # rows of the query's first day older than the kept seconds
                kept = [i for i, s in enumerate(seen_col) if s >= floor]
                key_col, epoch_col, part_col, offset_col, index_col, seen_col = (
                    [col[i] for i in kept] for col in block)
                if not kept:
                    continue
            epochs = set(epoch_col)
            with self._open():
                numbers = {e: self.epoch_no(e) for e in epochs}
            nos: Iterable[int] = itertools.repeat(numbers[epoch_col[0]]) if len(epochs) == 1 else \
                [numbers[e] for e in epoch_col]
            if epochs == {log_epoch} and part_col.count(partition) == len(part_col):
                max_next = max(max_next, max(offset_col) + 1)
            else:
                max_next = max([max_next, *(o + 1 for e, p, o in zip(epoch_col, part_col, offset_col)
                                           if e == log_epoch and p == partition)])
            keys.extend(map(_KEY_PREFIX.__add__, key_col))
            records.extend(map(_RECORD.pack, nos, part_col, offset_col, index_col, seen_col))
            n += len(key_col)
            if len(keys) >= _INGEST_CHUNK:
                self._merge_sorted(keys, records)
                keys, records = [], []
        if keys:
            self._merge_sorted(keys, records)
        self._loaded_up_to(partition, current_no, max_next, generation, owned)
        return n

    def _load_start(self, log_epoch: str, partition: int, generation: int | None,
                    now: float | None) -> tuple[int, float, int]:
        """What a load needs before its first row: the partition's generation (taken now unless given, so a
        revocation during the load is seen), the oldest `seen_at` still kept, and the log epoch's number."""
        generation = self.generation(partition) if generation is None else generation
        floor = (time.time() if now is None else now) - self.keep_seconds
        with self._open():
            return generation, floor, self.epoch_no(log_epoch)

    def _loaded_up_to(self, partition: int, epoch_no: int, max_next: int, generation: int, owned: bool) -> None:
        """After a load: advance the partition's marker (`foreign_marker` if not `owned`) to what it read,
        and mark an owned partition loaded unless it was revoked since `generation`."""
        with self._open():
            marker = self.marker(partition) if owned else self.foreign_marker(partition)
            if marker is None or marker[0] != epoch_no or max_next > marker[1]:
                self._set_marker(partition, epoch_no, max_next, _MARKER_PREFIX if owned else _FOREIGN_PREFIX)
            if owned and self._generations.get(partition, 0) == generation:
                self._loaded.add(partition)

    def _merge_sorted(self, keys: list[bytes], records: list[bytes]) -> None:
        """One chunk of `load_sorted`: ingested as it is when every key is new and the keys increase
        strictly (checked in C-level loops), else decided row by row as `load_rows` does."""
        existing: list[bytes | None] = []
        with self._open():
            for i in range(0, len(keys), _GET_SLICE):
                existing.extend(self._db[keys[i:i + _GET_SLICE]])
        if existing.count(None) == len(existing) and all(map(bytes.__lt__, keys, itertools.islice(keys, 1, None))):
            self._ingest(keys, records)
        else:
            self._merge_chunk(list(zip(keys, records)), existing, ingest=True)

    def _merge_chunk(self, chunk: Sequence[tuple[bytes, bytes]], existing: list[bytes | None] | None = None, *,
                     ingest: bool = False) -> None:
        """Merge one chunk of loaded records (in stream order) into the cache, in one atomic write (an
        ingested SST file if `ingest`), before the next chunk is read: so the first stored row of a key
        wins across chunks too. `existing`: the chunk's cached records, if already read."""
        if existing is None:
            with self._open():
                existing = self._db[[k for k, _ in chunk]]
        first: dict[bytes, bytes] = {}  # the records to write: the first sighting of each key
        retractions: dict[bytes, bytes] = {}  # a row met twice (not merged yet) records its conflict once
        for (k, v), cached in zip(chunk, existing):
            old = first.get(k, cached)
            if old is None or _expired(old, v, self.horizon_seconds):
                first[k] = v
            elif old[:20] != v[:20] and not _expired(v, old, self.horizon_seconds):
                self.conflicts += 1
                winner, loser = (old, v) if first_sighting(self._sighting(old), self._sighting(v)) \
                    == self._sighting(old) else (v, old)
                if winner is v:
                    first[k] = v
                retractions[_retraction_key(k[1:], loser)] = _record(loser) + _record(winner)
                logger.warning("a dedupe key is stored at two positions: the later copy is retracted",
                               extra={"dedupe_key": k[1:].hex(), "winner": self._describe(winner),
                                      "loser": self._describe(loser)})
        if not first and not retractions:
            return
        if ingest:
            ordered = sorted([*first.items(), *retractions.items()])  # linear when the chunk was sorted
            self._ingest([k for k, _ in ordered], [v for _, v in ordered])
            return
        wb = WriteBatch(raw_mode=True)
        for k, v in first.items():
            wb.put(k, v)
        for k, v in retractions.items():
            wb.put(k, v)
        with self._open():
            self._db.write(wb)

    def _ingest(self, keys: Sequence[bytes], values: Sequence[bytes]) -> None:
        """Write strictly increasing `keys` and their values as one SST file and ingest it (moved, not
        copied): one atomic, durable step, as a WriteBatch is. RocksDB places the file as a whole: at
        the bottom of the tree when no other file overlaps it, else where compaction merges it."""
        os.makedirs(self._ingest_dir, exist_ok=True)
        path = os.path.join(self._ingest_dir, f"load-{threading.get_ident()}.sst")
        writer = SstFileWriter(self._sst_options)
        writer.open(path)
        try:
            collections.deque(map(writer.__setitem__, keys, values), maxlen=0)
            writer.finish()
            with self._open():
                self._db.ingest_external_file([path], self._ingest_options)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)

    def _sighting(self, record: bytes) -> Sighting:
        no, part, offset, index = _POS.unpack_from(record)
        return Sighting(_SEEN.unpack_from(record, 20)[0] if len(record) > 20 else 0, self._name(no), part, offset,
                        index)

    def _name(self, epoch_no: int) -> str:
        for name, no in self._epochs.items():
            if no == epoch_no:
                return name
        return f"#{epoch_no}"

    # ------------------------------------------------------------------ retractions
    def pending_retractions(self, partitions: Iterable[int] | None = None) -> list[Loser]:
        """Copies found stored after another copy of their key that ranks first (see module doc), not yet
        retracted, of the losers' `partitions` (None: all), by partition and key. Cheap when there are
        none: one seek per partition (the reconcile timer reads it every 2 s)."""
        prefixes = [_RETRACT_PREFIX] if partitions is None else \
            [_RETRACT_PREFIX + _PARTITION.pack(p) for p in sorted(set(partitions))]
        out = []
        with self._open():
            for prefix in prefixes:
                for k, v in self._db.items(from_key=prefix):
                    if not k.startswith(prefix):
                        break
                    out.append(Loser(k[5:21], self._sighting(v[:24]), self._sighting(v[24:])))
        return out

    def retracted(self, loser: Loser) -> None:
        """The loser's rows are undone: forget the pending retraction."""
        no = self.epoch_no(loser.loser.log_epoch)
        with self._open():
            self._db.delete(_retraction_key(loser.key, _POS.pack(no, loser.loser.partition, loser.loser.offset,
                                                                 loser.loser.index)))

    def _describe(self, record: bytes) -> str:
        no, part, offset, index = _POS.unpack_from(record)
        return f"{self._name(no)}:{part}:{offset}:{index}"

    @contextlib.contextmanager
    def _open(self) -> Iterator[None]:
        """Hold the database open for one operation of a loading thread (see `close`)."""
        with self._io:
            if self._closed:
                raise DedupeStateClosedError(f"dedupe state {self.path} was closed during a load")
            yield

    # ------------------------------------------------------------------ hot path
    def prefetch(self, keys: Sequence[bytes]) -> None:
        """Look every key of a batch up in RocksDB; `decide` then never touches the disk.

        A `get` per key, not one multi-get: rocksdict's multi-get took 0.64-0.78 µs a key, single gets
        0.26-0.44 (batches of 20k keys, mostly absent, with 0.2M to 1.6M keys cached; bloom filters on)."""
        batch = self._batch
        missing = [k for k in keys if k not in batch]
        if not missing:
            return
        get = self._db.get
        batch.update(zip(missing, [get(_KEY_PREFIX + k) for k in missing]))

    def decide(self, key: bytes, position: Position, seen: int | None = None) -> bool:
        """True iff `position` is the first sighting of `key` (recording it when the key is new).

        Absent -> record and accept; equal position -> a replay of the original -> accept; any other
        recorded position -> duplicate. A recorded position from another epoch is always older (the
        epoch only changes when the broker's log was reset), and a recorded *later* position of the same
        partition can only come from a lost write of the earlier one, whose windows never reached
        ClickHouse while the later one's did -- accepting both would double count, so it stays a drop.

        `seen` is the message's broker time (unix seconds): the record keeps it, and expiry is judged on
        it, never on the clock of the worker deciding: a copy whose recorded first sighting is more than
        the horizon older *in the log* is a new first sighting (recorded in its place), however late
        either is processed. So a replay decides alike, and a worker catching up on a backlog drops a
        copy sent on day 31.9 (its key is kept for the horizon plus the maximum lag: `keep_seconds`).
        Without `seen` (tests) `flush` stamps its own clock.
        """
        return self.decider(position[0], seen)(key, position)

    def decider(self, log_epoch: str, seen: int | None = None) -> Callable[[bytes, Position], bool]:
        """`decide` with the message's log epoch and broker time bound: the worker takes one per message
        (`processor.batch`), so what is the same for all its events is looked up once, not per event
        (with the epoch's number and a call through `functools.partial` with a keyword each time, a decision
        took 0.78-0.87 µs, now 0.64-0.71, Position included). Decisions and records are `decide`'s (it is
        this, called once)."""
        no = self.epoch_no(log_epoch)
        batch, new, get = self._batch, self._new, self._db.get
        pack = _POS.pack
        stamp = b"" if seen is None else _SEEN.pack(seen)  # without `seen` (tests) `flush` stamps its clock
        expired_before = None if seen is None else seen - self.horizon_seconds

        def decide(key: bytes, position: Position) -> bool:
            if position[0] != log_epoch:
                return self.decider(position[0], seen)(key, position)
            stored = batch.get(key, _UNSEEN)
            if stored is _UNSEEN:
                stored = get(_KEY_PREFIX + key)
            here = pack(no, position[1], position[2], position[3])
            if stored is None:
                batch[key] = new[key] = here + stamp
                return True
            if stored[:20] == here:
                batch[key] = stored
                return True
            if expired_before is not None and len(stored) > 20 and _SEEN.unpack_from(stored, 20)[0] < expired_before:
                batch[key] = new[key] = here + stamp  # the old one expired
                return True
            batch[key] = stored
            return False

        return decide

    def flush(self, *, now: float | None = None) -> None:
        """Persist the batch's new first sightings; call before writing the batch to ClickHouse."""
        if self._new:
            seen = _SEEN.pack(int(time.time() if now is None else now))
            wb = WriteBatch(raw_mode=True)
            # In key order: each memtable insert then starts near the previous one's place in the skip list
            # (the keys are hashes, so a batch's order is random): ~0.3-0.5 µs less a key, sort included.
            new = self._new
            for k in sorted(new):  # the keys alone: sorting (key, record) pairs compares tuples, twice the time
                v = new[k]
                wb.put(_KEY_PREFIX + k, v if len(v) > 20 else v + seen)
            self._db.write(wb)
        self._new.clear()
        self._batch.clear()

    def forget_first_sightings(self, message: Position, keys: Sequence[bytes]) -> int:
        """Delete the records of `keys` whose first sighting is inside `message` (its epoch, partition
        and offset; the index is ignored): after ClickHouse refused that message, nothing of it is stored,
        and the cache must not claim otherwise. Returns how many were deleted."""
        prefix = _POS.pack(self.epoch_no(message[0]), message[1], message[2], 0)[:16]
        wb = WriteBatch(raw_mode=True)
        n = 0
        for key in set(keys):
            stored = self._db.get(_KEY_PREFIX + key)
            if stored is not None and stored[:16] == prefix:
                wb.delete(_KEY_PREFIX + key)
                n += 1
        self._db.write(wb)
        return n

    def discard_batch(self) -> None:
        """Drop unflushed decisions (tests model a crash with this)."""
        self._new.clear()
        self._batch.clear()

    # ------------------------------------------------------------------ maintenance
    def purge(self, *, now: float | None = None) -> int:
        """Delete keys first seen (broker time) longer ago than `keep_seconds`; returns how many.

        A full scan, run at startup and then every few hours from a thread: RocksDB iterates ~1M
        keys/s. Judged on this worker's clock, hence the margin of the maximum lag beyond the horizon:
        no message still in the log can need a key older than that (see `decide`).
        """
        floor = (time.time() if now is None else now) - self.keep_seconds
        wb = WriteBatch(raw_mode=True)
        n = 0
        for k, v in self._db.items(from_key=_KEY_PREFIX):
            if not k.startswith(_KEY_PREFIX):
                break
            if _SEEN.unpack_from(v, 20)[0] < floor:
                wb.delete(k)
                n += 1
                if n % 100_000 == 0:
                    self._db.write(wb)
                    wb = WriteBatch(raw_mode=True)
        for k, v in self._db.items(from_key=_RETRACT_PREFIX):
            if not k.startswith(_RETRACT_PREFIX):
                break
            if _SEEN.unpack_from(v, 20)[0] < floor:  # its rows are past every horizon too
                wb.delete(k)
        self._db.write(wb)
        return n

    def lookup(self, key: bytes) -> Position | None:
        """The recorded first sighting of `key` (diagnostics and tests)."""
        v = self._db.get(_KEY_PREFIX + key)
        if v is None:
            return None
        no, part, offset, index = _POS.unpack_from(v)
        return Position(self._name(no), part, offset, index)

    def close(self) -> None:
        """Flush memtables and close the database (the WAL already makes writes crash-safe).

        Waits for a loading thread's current database operation; its next one raises instead of touching
        a closed database. Safe to call twice."""
        with self._io:
            if self._closed:
                return
            self._closed = True
            try:
                self._db.flush()
            finally:
                self._db.close()
