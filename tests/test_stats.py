"""client/stats.py: the frozen records of db.stats(), assembled from a counters reply and the session's view."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import pytest

from protobase.client.stats import DatabaseStats, OldestReader, ReaderStats, collect_stats, process_uss
from protobase.core.cache import CacheStats
from protobase.shm import names
from protobase.shm.control import ReaderSlot
from protobase.wire.counters import COUNTER_NAMES, Counters


def counters(**changes: object) -> Counters:
    """A "stats" reply with every field of the schema, distinct values so that a swapped field shows."""
    reply = {name: 1000 + index for index, name in enumerate(COUNTER_NAMES)}
    reply.update(seq=50, mapped_bytes=9000, live_bytes=4000, persistence_pid=None, oldest_reader=None)
    reply.update(changes)
    assert set(reply) == set(COUNTER_NAMES)
    return reply  # type: ignore[return-value]


class FakeCache:
    def __init__(self, stats: CacheStats) -> None:
        self._stats = stats

    def stats(self) -> CacheStats:
        return self._stats


def fake_session(readers: list[ReaderSlot], instance_id: str | None = None) -> SimpleNamespace:
    """What collect_stats reads of a Session: path, instance id, the reader table, the store's caches."""
    return SimpleNamespace(
        path="/srv/db",
        instance_id=instance_id or names.new_instance_id(),
        control=SimpleNamespace(readers=lambda: readers),
        store=SimpleNamespace(
            objects=FakeCache(CacheStats("objects", 3, 10, 7, 2)), bytes=FakeCache(CacheStats("bytes", 1, 5, 0, 1))
        ),
    )


def reader(slot: int, pid: int, snapshot_seq: int | None) -> ReaderSlot:
    return ReaderSlot(slot=slot, pid=pid, start_time=0.0, snapshot_seq=snapshot_seq)


def test_every_counter_lands_in_its_field():
    reply = counters()
    stats = collect_stats(fake_session([]), reply)
    assert stats.path == "/srv/db" and stats.seq == 50
    assert stats.coordinator_pid == reply["pid"] and stats.persistence_pid is None
    for field in (
        "durable_lsn",
        "last_lsn",
        "checkpoints",
        "wal_bytes_since_checkpoint",
        "wal_syncs",
        "commits",
        "conflicts",
        "compactions",
        "compaction_failures",
        "gc_pauses",
        "gc_longest_pause_ms",
        "gc_pause_total_ms",
        "gc_freezes",
        "segments",
        "allocated_bytes",
        "live_bytes",
    ):
        assert getattr(stats, field) == reply[field], field
    assert stats.data_bytes == reply["mapped_bytes"]


def test_reclaimable_bytes_are_the_mapped_bytes_not_live():
    stats = collect_stats(fake_session([]), counters(mapped_bytes=9000, live_bytes=4000))
    assert stats.reclaimable_bytes == 5000


def test_readers_come_from_the_reader_table_with_their_age_in_commits():
    table = [reader(0, 11, 45), reader(3, 12, None)]
    stats = collect_stats(fake_session(table), counters(seq=50))
    assert stats.readers == (
        ReaderStats(slot=0, pid=11, snapshot_seq=45, snapshot_age=5),
        ReaderStats(slot=3, pid=12, snapshot_seq=None, snapshot_age=None),
    )


def test_the_oldest_reader_is_none_until_one_holds_a_snapshot():
    assert collect_stats(fake_session([]), counters(oldest_reader=None)).oldest_reader is None
    held = {"slot": 2, "pid": 77, "snapshot_seq": 40, "held_seconds": 1.5, "retained_bytes": 4096}
    stats = collect_stats(fake_session([]), counters(oldest_reader=held))
    assert stats.oldest_reader == OldestReader(slot=2, pid=77, snapshot_seq=40, held_seconds=1.5, retained_bytes=4096)


def test_cache_statistics_are_this_process_s():
    stats = collect_stats(fake_session([]), counters())
    assert stats.object_cache == CacheStats("objects", 3, 10, 7, 2)
    assert stats.object_cache.hit_rate == pytest.approx(7 / 9)
    assert stats.bytes_cache.name == "bytes"


def test_shared_bytes_sum_the_instance_s_entries_in_dev_shm_only():
    instance = names.new_instance_id()
    other = names.new_instance_id()
    paths = [
        os.path.join(names.SHM_DIR, names.segment_name(iid, suffix).lstrip("/"))
        for iid, suffix in ((instance, "control"), (instance, "1"), (other, "1"))
    ]
    try:
        for path, size in zip(paths, (100, 250, 999)):
            with open(path, "wb") as file:
                file.truncate(size)
        assert collect_stats(fake_session([], instance), counters()).shared_bytes == 350
    finally:
        for path in paths:
            os.unlink(path)
    assert collect_stats(fake_session([], instance), counters()).shared_bytes == 0


@pytest.mark.parametrize(
    "record",
    [
        ReaderStats(0, 1, None, None),
        OldestReader(0, 1, 2, 0.0, 0),
    ],
)
def test_the_records_are_frozen(record):
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.pid = 2


def test_a_database_stats_record_is_frozen_too():
    stats = collect_stats(fake_session([]), counters())
    assert isinstance(stats, DatabaseStats)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.seq = 0


def test_process_uss_measures_a_process_by_pid_or_this_one():
    assert process_uss() > 0 and process_uss(os.getpid()) > 0
