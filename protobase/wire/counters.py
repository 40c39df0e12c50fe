"""The counters schema: what the coordinator's "stats" reply holds, field by field.

Both sides use it: the coordinator builds a `Counters` (coordinator/server.py),
the client reads one into `db.stats()` (client/stats.py). Invariant: the reply
has exactly the keys of `Counters`, no more, no fewer (tests/test_server.py
checks a live coordinator against it), so the two sides cannot drift apart.
"""

from __future__ import annotations

from typing import TypedDict

__all__ = ["Counters", "OldestReaderCounters", "COUNTER_NAMES"]


class OldestReaderCounters(TypedDict):
    """The reader holding the oldest snapshot, as the coordinator sees it."""

    slot: int
    pid: int
    snapshot_seq: int
    held_seconds: float  # since the coordinator first saw it hold that snapshot
    retained_bytes: int  # bytes of retired segments kept mapped for it


class Counters(TypedDict):
    """The reply to a "stats" request: one consistent reading of the coordinator's state."""

    seq: int  # the last commit
    published_seq: int  # the last commit readers can see
    commits: int  # commits applied since the coordinator started
    commit_groups: int  # groups they were applied in (one write and publish each); commits / groups = grouping
    conflicts: int  # commits refused for a conflict
    compactions: int
    checkpoints: int
    compaction_failures: int
    oldest_reader: OldestReaderCounters | None  # None when no reader holds a snapshot
    allocated_bytes: int  # bytes of atoms appended to the data segments
    live_bytes: int  # estimate of bytes reachable from the root
    mapped_bytes: int  # bytes of data segments mapped
    segments: int  # data segments of the current generation
    clients: int  # connected clients
    pid: int  # the coordinator's
    persistence_pid: int | None  # the persistence process's, None while it restarts
    durable_lsn: int  # the last WAL record known on disk
    last_lsn: int  # the last WAL record handed to the persistence process
    wal_bytes_since_checkpoint: int
    wal_syncs: int
    recovered_records: int  # WAL records replayed at start-up
    gc_pauses: int  # collections of the cyclic GC in the coordinator since it started (protobase/collector.py)
    gc_longest_pause_ms: float  # the longest of them
    gc_pause_total_ms: float  # all of them together
    gc_freezes: int  # times its GC policy froze what survived a collection (start-up's too); 0: CPython's policy


#: The keys of a "stats" reply, in schema order.
COUNTER_NAMES: tuple[str, ...] = tuple(Counters.__annotations__)
