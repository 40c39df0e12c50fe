"""The coordinator (coordinator/server.py) under conditions a client cannot cause politely.

- a compaction that finds /dev/shm full is undone: the commit that triggered it
  gets one reply, "ok"; checkpoints and backups name the segments the root
  lives in; every acknowledged commit survives a restart.

Coordinators are real processes, started by `protobase.open`; the /dev/shm
fault comes through the environment they inherit (shm/segment.py).
"""

from __future__ import annotations

import os

import pytest

import protobase
from protobase.arena import FIRST_SEGMENT, segment_of
from protobase.checkpoint import read_checkpoint
from protobase.errors import ProtoBaseError
from protobase.shm import DEFAULT_READER_SLOTS, HEADER_SIZE, SLOT_SIZE
from protobase.shm import ring as commit_ring
from protobase.shm.segment import FAULTS_ENV
from tests.conftest import GRACE, wait_for_coordinator_exit

DEADLINE = 60.0  # seconds any one wait may take before the test fails
COMPACT_MIN = 1 << 20


# -- a compaction on a full /dev/shm ---------------------------------------------------------------

# What the coordinator reserves before its data: the control segment and the commit ring.
FIXED_SEGMENTS = HEADER_SIZE + DEFAULT_READER_SLOTS * SLOT_SIZE + commit_ring.DATA_OFFSET + commit_ring.DEFAULT_CAPACITY


def commit_numbered(db: protobase.Database, number: int) -> None:
    """Commit `number` under its own key, and garbage: a 20 kB blob every commit replaces."""
    with db.transaction() as tx:
        tx.root[f"c{number}"] = number
        tx.root["blob"] = f"{number}:" + "x" * 20_000


def assert_holds(db: protobase.Database, numbers: list[int]) -> None:
    with db.snapshot() as snap:
        assert [snap.root.get(f"c{number}") for number in numbers] == numbers
        assert snap.root["blob"].startswith(f"{numbers[-1]}:")
    db.check()


def test_a_compaction_on_full_shm_is_undone_and_its_commit_answered_ok_once(datadir, monkeypatch):
    # Room for two 1 MiB data segments: the compaction that the second one's garbage
    # triggers cannot get a segment for its copy.
    monkeypatch.setenv(FAULTS_ENV, f"enospc_after={FIXED_SEGMENTS + 2 * FIRST_SEGMENT}")
    backup = os.path.join(os.path.dirname(datadir), "backup")
    acknowledged: list[int] = []
    with protobase.open(datadir, shutdown_grace=GRACE, compact_min_bytes=COMPACT_MIN) as db:
        while db.stats().compaction_failures == 0:
            assert len(acknowledged) < 200, "no compaction was tried"
            commit_numbered(db, len(acknowledged))  # the one that triggers it returns normally
            acknowledged.append(len(acknowledged))
        for _ in range(3):  # replies stay in step, and commits go on in the old generation
            commit_numbered(db, len(acknowledged))
            acknowledged.append(len(acknowledged))
        with pytest.raises(ProtoBaseError, match=r"compaction failed and was undone, the database is unchanged: "
                                                 r"shared memory \(/dev/shm\) is full"):
            db.compact()
        stats = db.stats()
        assert (stats.compactions, stats.compaction_failures) == (0, 2)
        assert_holds(db, acknowledged)

        checkpoint = read_checkpoint(db.backup(backup))  # what the checkpoint code lists as the generation
        assert segment_of(checkpoint.root) in {index for index, _, _ in checkpoint.segments}
    monkeypatch.delenv(FAULTS_ENV)
    assert wait_for_coordinator_exit(datadir)

    for path in (datadir, backup):
        with protobase.open(path, shutdown_grace=GRACE) as db:
            assert_holds(db, acknowledged)
        assert wait_for_coordinator_exit(path)
