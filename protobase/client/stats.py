"""Statistics of a database as frozen records (`db.stats()`).

Owns the records `db.stats()` returns and how they are assembled from the
coordinator's counters (the schema is wire/counters.py `Counters`), this
process's reader table view and caches, and the sizes of the instance's
shared-memory entries. Runs in client processes. The records are frozen: one
reading, taken at `taken_at`, never updated.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from protobase.core.cache import CacheStats
from protobase.shm import names
from protobase.wire.counters import Counters

if TYPE_CHECKING:
    from protobase.client.session import Session

__all__ = ["DatabaseStats", "ReaderStats", "OldestReader", "collect_stats"]


@dataclass(frozen=True)
class ReaderStats:
    """One process in the reader table."""

    slot: int
    pid: int
    snapshot_seq: int | None  # oldest snapshot it holds, or None
    snapshot_age: int | None  # commits since that snapshot


@dataclass(frozen=True)
class OldestReader:
    """The reader holding the oldest snapshot: the one that keeps retired memory from being unlinked.

    A reader that stopped (SIGSTOP, a debugger, a hung worker) is alive, so it
    is never reaped: this names it. LMDB's `mdb_reader_list` plays this part.
    """

    slot: int
    pid: int
    snapshot_seq: int
    held_seconds: float  # since the coordinator first saw it hold that snapshot (to within 0.2 s)
    retained_bytes: int  # bytes of segments retired after its snapshot, unlinked once it lets go


@dataclass(frozen=True)
class DatabaseStats:
    """What `db.stats()` returns: one consistent reading of counters."""

    path: str
    seq: int  # sequence number of the latest commit
    coordinator_pid: int
    persistence_pid: int | None
    durable_lsn: int  # every commit up to this WAL record is fsynced
    last_lsn: int  # WAL record of the latest commit (durable_lsn - last_lsn is the lag)
    checkpoints: int  # written since the coordinator started
    wal_bytes_since_checkpoint: int
    wal_syncs: int  # fdatasyncs of the WAL since the coordinator started; commits per sync = group commit
    commits: int  # since the coordinator started
    commit_groups: int  # groups they were applied in, one write and publish each (commits / groups)
    conflicts: int
    compactions: int
    compaction_failures: int  # compactions undone (/dev/shm full, ...): the data stayed as it was
    gc_pauses: int  # collections of the cyclic GC in the coordinator since it started
    gc_longest_pause_ms: float  # the longest of them (protobase/collector.py keeps it short)
    gc_pause_total_ms: float  # all of them together
    gc_freezes: int  # times its GC policy froze what survived a collection; 0: it runs CPython's policy
    segments: int  # live data segments
    shared_bytes: int  # bytes of shared memory the instance holds (data + control)
    data_bytes: int  # bytes of the live data segments
    allocated_bytes: int  # bytes appended to data segments since the coordinator started
    live_bytes: int  # reachable from the latest root (an upper estimate between compactions)
    reclaimable_bytes: int  # data_bytes - live_bytes: garbage, free tails, segments awaiting unlink
    readers: tuple[ReaderStats, ...]
    oldest_reader: OldestReader | None  # None when no reader holds a snapshot
    object_cache: CacheStats
    bytes_cache: CacheStats
    taken_at: float  # time.time() of the reading


def collect_stats(session: Session, counters: Counters) -> DatabaseStats:
    """The DatabaseStats of one "stats" reply, with what `session` sees of readers, caches and segments."""
    control = session.control
    seq = counters["seq"]
    readers = tuple(
        ReaderStats(r.slot, r.pid, r.snapshot_seq, None if r.snapshot_seq is None else seq - r.snapshot_seq)
        for r in control.readers()
    )
    held = counters["oldest_reader"]
    oldest = (
        None
        if held is None
        else OldestReader(
            slot=held["slot"],
            pid=held["pid"],
            snapshot_seq=held["snapshot_seq"],
            held_seconds=held["held_seconds"],
            retained_bytes=held["retained_bytes"],
        )
    )
    shared = sum(
        _size(os.path.join(names.SHM_DIR, entry.lstrip("/"))) for entry in names.instance_entries(session.instance_id)
    )
    return DatabaseStats(
        path=session.path,
        seq=seq,
        coordinator_pid=counters["pid"],
        persistence_pid=counters["persistence_pid"],
        durable_lsn=counters["durable_lsn"],
        last_lsn=counters["last_lsn"],
        checkpoints=counters["checkpoints"],
        wal_bytes_since_checkpoint=counters["wal_bytes_since_checkpoint"],
        wal_syncs=counters["wal_syncs"],
        commits=counters["commits"],
        commit_groups=counters["commit_groups"],
        conflicts=counters["conflicts"],
        compactions=counters["compactions"],
        compaction_failures=counters["compaction_failures"],
        gc_pauses=counters["gc_pauses"],
        gc_longest_pause_ms=counters["gc_longest_pause_ms"],
        gc_pause_total_ms=counters["gc_pause_total_ms"],
        gc_freezes=counters["gc_freezes"],
        segments=counters["segments"],
        shared_bytes=shared,
        data_bytes=counters["mapped_bytes"],
        allocated_bytes=counters["allocated_bytes"],
        live_bytes=counters["live_bytes"],
        reclaimable_bytes=counters["mapped_bytes"] - counters["live_bytes"],
        readers=readers,
        oldest_reader=oldest,
        object_cache=session.store.objects.stats(),
        bytes_cache=session.store.bytes.stats(),
        taken_at=time.time(),
    )


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:  # unlinked by a compaction since we listed it
        return 0


def process_uss(pid: int | None = None) -> int:
    """Unique set size of a process: memory only it holds (shared pages excluded)."""
    return psutil.Process(pid).memory_full_info().uss
