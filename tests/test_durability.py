"""Durability: what was acknowledged survives restarts, crashes and disk errors."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from protobase.cli import main as cli
from protobase.coordinator import durability as durability_module
from protobase.coordinator.durability import Durability, DurabilityFailed
from protobase.core.datadir import DataDir, FileLock
from protobase.errors import CoordinatorError, CorruptionError
from protobase.persistence.checkpoint import checkpoint_files
from protobase.persistence.process import EXIT_DISK_FAILURE, Persistence
from protobase.persistence.wal.faults import CHECKPOINT_GATE_ENV, FAULTS_ENV
from protobase.persistence.wal.files import list_wal_files
from protobase.persistence.wal.reader import WalRecord, read_directory, read_records, scan
from protobase.persistence.wal.writer import WalWriter
from protobase.shm import names
from protobase.shm.control import ControlBlock, process_start_time
from protobase.shm.ring import SYNC, CommitRing
from protobase.wire.framing import FrameReader
from tests.conftest import SPAWN, open_test_db, wait_for_coordinator_exit, wait_until


def commit_counter(db, key: str, value: int, durability: str | None = None) -> None:
    with db.transaction(durability=durability) as tx:
        tx.root[key] = {"value": value}


def read(path: str, key: str):
    with open_test_db(path) as db:
        with db.snapshot() as snap:
            value = snap.root.get(key)
            return None if value is None else value["value"]


def kill_and_wait(pid: int) -> None:
    process = psutil.Process(pid)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def test_a_clean_restart_keeps_everything_and_replays_nothing(datadir):
    with open_test_db(datadir) as db:
        for i in range(20):
            commit_counter(db, f"k{i % 5}", i)
        with db.transaction() as tx:
            tx.root["big"] = {f"u{i}": {"n": i} for i in range(500)}
    assert wait_for_coordinator_exit(datadir)
    assert [name for name in os.listdir(datadir) if name.startswith("checkpoint-")], "no final checkpoint"
    with open_test_db(datadir) as db:
        with db.snapshot() as snap:
            assert [snap.root[f"k{i}"]["value"] for i in range(5)] == [15, 16, 17, 18, 19]
            assert snap.root["big"]["u499"] == {"n": 499} and len(snap.root["big"]) == 500
        db.check()
        assert db.stats().seq == 21


def test_a_killed_coordinator_loses_no_acknowledged_commit(datadir):
    db = open_test_db(datadir)
    for i in range(30):
        commit_counter(db, "counter", i)
    with db.transaction() as tx:
        tx.root["big"] = {f"u{i}": i for i in range(300)}
        tx.root["big"]["u7"] = -7
    kill_and_wait(db.coordinator_pid)
    with db.snapshot() as snap:  # the handle reattaches: a new coordinator recovered everything
        assert snap.root["counter"]["value"] == 29
        assert snap.root["big"]["u7"] == -7 and len(snap.root["big"]) == 300
    assert db.stats().seq == 31
    commit_counter(db, "counter", 99)
    db.check()
    db.close()


def test_a_killed_persistence_process_is_restarted_transparently(datadir):
    with open_test_db(datadir) as db:
        commit_counter(db, "counter", 1)
        first = db.stats().persistence_pid
        kill_and_wait(first)
        for i in range(2, 12):
            commit_counter(db, "counter", i)  # waits for the restarted process's fsync
        assert db.stats().persistence_pid not in (None, first)
    with open_test_db(datadir) as db:
        with db.snapshot() as snap:
            assert snap.root["counter"]["value"] == 11


def test_async_commits_are_durable_after_the_flush_interval(datadir):
    with open_test_db(datadir, durability="async", flush_interval=0.005) as db:
        for i in range(100):
            commit_counter(db, "counter", i)
        stats = db.stats()
        assert stats.last_lsn == 100
    assert wait_for_coordinator_exit(datadir)
    assert read(datadir, "counter") == 99


def test_a_sync_commit_is_durable_when_it_returns(datadir):
    with open_test_db(datadir) as db:
        commit_counter(db, "counter", 1)
        stats = db.stats()
        assert stats.durable_lsn == stats.last_lsn == 1
        records = list(read_directory(datadir))
        assert [lsn for lsn, _ in records] == [1]


@pytest.mark.parametrize(
    "fault, reason", [("enospc_after=2048", "No space left on device"), ("fsync_error_after=2", "fsync")]
)
def test_a_disk_failure_is_never_acknowledged_and_loses_nothing_acknowledged(datadir, monkeypatch, fault, reason):
    monkeypatch.setenv("PROTOBASE_WAL_FAULTS", fault)
    acknowledged = -1
    with open_test_db(datadir) as db:
        with pytest.raises(CoordinatorError, match="NOT made durable") as failure:
            for i in range(10_000):
                commit_counter(db, "counter", i)
                acknowledged = i
        assert reason.lower() in str(failure.value).lower()
    monkeypatch.delenv("PROTOBASE_WAL_FAULTS")
    assert wait_for_coordinator_exit(datadir)
    assert read(datadir, "counter") in (acknowledged, acknowledged + 1)  # the failed one may or may not be on disk
    if fault.startswith("enospc"):
        assert read(datadir, "counter") == acknowledged  # a failed write is truncated away


def test_a_full_disk_refuses_every_later_commit_with_the_clear_error(datadir, monkeypatch):
    # Once the WAL write failed, the coordinator stopped: the next commit got "lost the
    # coordinator" (a broken pipe), which says nothing of the disk or of what was kept.
    monkeypatch.setenv(FAULTS_ENV, "enospc_after=8192")
    acknowledged = 0
    with open_test_db(datadir, durability="async") as db:
        with pytest.raises(CoordinatorError, match="NOT made durable") as failure:
            for i in range(100_000):
                commit_counter(db, f"k{i}", i)
                acknowledged += 1
        assert "No space left on device" in str(failure.value)
        for mode in ("async", "sync", "async"):
            with pytest.raises(CoordinatorError, match="No space left on device.*NOT made durable.*nor is any later"):
                commit_counter(db, "later", 0, durability=mode)
    monkeypatch.delenv(FAULTS_ENV)
    assert wait_for_coordinator_exit(datadir)
    with open_test_db(datadir) as db:
        with db.snapshot() as snap:
            kept = len(snap.root)
            # What a full disk takes is the async commits acknowledged after the last record
            # written, never one before it, and never a refused commit.
            assert sorted(snap.root, key=lambda key: int(key[1:])) == [f"k{i}" for i in range(kept)]
    assert 0 < kept <= acknowledged


def test_corruption_before_valid_records_refuses_to_open(datadir):
    with open_test_db(datadir) as db:
        for i in range(5):
            commit_counter(db, "counter", i, durability="sync")
        pid = db.coordinator_pid
        kill_and_wait(pid)  # no final checkpoint: the state lives in the WAL
        db.close()
    assert wait_for_coordinator_exit(datadir)
    ((_, path),) = list_wal_files(datadir)
    result = scan(path)
    offset = result.records[2].offset + 30  # inside the third record's payload
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x40]))
    with pytest.raises(CorruptionError, match=f"WAL file {path} is corrupt at offset {result.records[2].offset}"):
        open_test_db(datadir)
    assert wait_for_coordinator_exit(datadir)


def test_a_torn_tail_recovers_to_the_last_complete_commit(datadir):
    with open_test_db(datadir) as db:
        for i in range(5):
            commit_counter(db, "counter", i)
        kill_and_wait(db.coordinator_pid)
        db.close()
    assert wait_for_coordinator_exit(datadir)
    ((_, path),) = list_wal_files(datadir)
    last = scan(path).records[-1]
    with open(path, "r+b") as file:
        file.truncate(last.offset + 10)  # the last record is cut in its header
    assert read(datadir, "counter") == 3
    with open_test_db(datadir) as db:  # and the log goes on from there
        commit_counter(db, "counter", 42)
        db.check()
    assert read(datadir, "counter") == 42


def test_recovery_time_and_state_after_many_commits(datadir):
    with open_test_db(datadir, durability="async") as db:
        with db.transaction() as tx:
            tx.root["users"] = {f"u{i}": {"score": 0} for i in range(2000)}
        for i in range(200):
            with db.transaction() as tx:
                tx.root["users"][f"u{i * 7 % 2000}"]["score"] += 1
        kill_and_wait(db.coordinator_pid)
        db.close()
    assert wait_for_coordinator_exit(datadir)
    with open_test_db(datadir) as db:
        with db.snapshot() as snap:
            assert sum(user["score"] for user in snap.root["users"].values()) == 200
        db.check()


def test_the_wal_is_locked_by_the_persistence_process_once_open_returns(datadir):
    with open_test_db(datadir):
        probe = FileLock(DataDir(datadir).file("wal.lock"))
        try:
            assert not probe.acquire(blocking=False)
        finally:
            probe.release()


def test_a_wal_that_cannot_be_created_fails_the_open_clearly(datadir, monkeypatch):
    monkeypatch.setenv("PROTOBASE_WAL_FAULTS", "fsync_error=1")
    with pytest.raises(CoordinatorError, match="write-ahead log of .*: .*cannot create WAL file .*Input/output error"):
        open_test_db(datadir)


def crash_after_commits(path: str, count: int) -> str:
    """Commit k0..k{count-1} (seq and LSN 1..count), kill the coordinator (no final checkpoint); the WAL file."""
    with open_test_db(path) as db:
        for i in range(count):
            with db.transaction() as tx:
                tx.root[f"k{i}"] = {"value": i}
        kill_and_wait(db.coordinator_pid)
        db.close()
    assert wait_for_coordinator_exit(path)
    ((_, wal_path),) = list_wal_files(path)
    return wal_path


def damage_records(wal_path: str, *indexes: int) -> list[WalRecord]:
    """Flip bytes inside the payloads of these records (0 = the first) of a WAL file; those records."""
    records = scan(wal_path).records
    with open(wal_path, "r+b") as file:
        for index in indexes:
            file.seek(records[index].offset + 30)
            file.write(b"\xff\xff")
    return [records[index] for index in indexes]


def salvaged_keys(destination: str) -> list[str]:
    try:
        with open_test_db(destination) as db:
            with db.snapshot() as snap:
                keys = sorted(snap.root, key=lambda key: int(key[1:]))
            db.check()
    finally:
        assert wait_for_coordinator_exit(destination)
    return keys


def test_protobase_recover_stops_at_the_first_lost_commit_and_names_it(datadir, capsys):
    # Applying commits 26..50 over a state without commit 25 builds a state that never was
    # (a later commit may depend on it); recover did that and said "0 skipped".
    (damaged,) = damage_records(crash_after_commits(datadir, 50), 24)  # the commit of k24: seq and LSN 25
    before = sorted(os.listdir(datadir))
    destination = os.path.join(os.path.dirname(datadir), "salvaged")
    assert cli.main(["recover", datadir, destination]) == 0
    output = capsys.readouterr().out
    assert "recovered 24 commits up to seq 24 into" in output and f"unreadable bytes {damaged.offset}.." in output
    assert (
        f"LOST: WAL record 25 (damaged or missing), the commit after seq 24; recovery stopped there, since a "
        f"later commit may depend on a lost one: 25 intact WAL records after it were not applied. To apply "
        f"them anyway, run `protobase recover --past-gaps {datadir} ANOTHER_NEW_DIR`"
    ) in output
    assert sorted(os.listdir(datadir)) == before  # the damaged directory is only read
    assert salvaged_keys(destination) == [f"k{i}" for i in range(24)]


def test_protobase_recover_past_gaps_applies_every_intact_commit_and_lists_each_skipped(datadir, capsys):
    damage_records(crash_after_commits(datadir, 50), 24, 30, 31, 32)  # LSN 25 and 31..33
    destination = os.path.join(os.path.dirname(datadir), "salvaged")
    assert cli.main(["recover", "--past-gaps", datadir, destination]) == 0
    output = capsys.readouterr().out
    assert "recovered 46 commits up to seq 50 (past gaps) into" in output
    assert "skipped WAL record 25: damaged or missing\n" in output
    assert "skipped WAL records 31..33: damaged or missing\n" in output and "LOST" not in output
    assert salvaged_keys(destination) == [f"k{i}" for i in range(50) if i not in (24, 30, 31, 32)]


def test_protobase_recover_salvages_the_records_of_a_wal_file_with_a_damaged_header(datadir, capsys):
    wal_path = crash_after_commits(datadir, 100)
    with open(wal_path, "r+b") as file:
        file.seek(20)  # inside the salt
        byte = file.read(1)
        file.seek(20)
        file.write(bytes([byte[0] ^ 0x08]))
    with pytest.raises(CorruptionError, match="damaged file header"):
        open_test_db(datadir)
    assert wait_for_coordinator_exit(datadir)
    destination = os.path.join(os.path.dirname(datadir), "salvaged")
    assert cli.main(["recover", datadir, destination]) == 0
    output = capsys.readouterr().out
    assert "recovered 100 commits up to seq 100 into" in output and f"unreadable bytes 0..32 of {wal_path}" in output
    assert salvaged_keys(destination) == [f"k{i}" for i in range(100)]


def test_a_commit_larger_than_the_commit_ring_goes_through_and_survives(datadir):
    big = {f"u{i}": {"name": "x" * 200, "n": i} for i in range(30_000)}  # ~7 MB of WAL: more than the ring
    with open_test_db(datadir) as db:
        with db.transaction() as tx:
            tx.root["big"] = big
        kill_and_wait(db.coordinator_pid)  # no final checkpoint: it must come back from the WAL
        db.close()
    assert wait_for_coordinator_exit(datadir)
    with open_test_db(datadir) as db:
        with db.snapshot() as snap:
            assert len(snap.root["big"]) == 30_000 and snap.root["big"]["u29999"]["n"] == 29_999


def _commit_sync_many(path: str, writer: int, commits: int, start: Any = None) -> None:
    with open_test_db(path) as db:
        if start is not None:
            start.wait(60)  # every writer is connected: their commits overlap, whatever spawning took
        for i in range(commits):
            commit_counter(db, f"w{writer}", i)


def test_concurrent_sync_commits_share_fsyncs(datadir, monkeypatch, spawn_process):
    # A slow disk (every fdatasync takes 20 ms more): while one sync runs, the other
    # writers' commits queue in the ring, and the next batch makes them all durable at once.
    monkeypatch.setenv("PROTOBASE_WAL_FAULTS", "fsync_delay_ms=20")
    writers, commits = 4, 15
    with open_test_db(datadir) as db:
        before = db.stats()
        start = SPAWN.Barrier(writers)  # (without it, one writer could be done before the next had started)
        processes = [spawn_process(_commit_sync_many, datadir, writer, commits, start) for writer in range(writers)]
        for process in processes:
            process.join(timeout=120)
            assert process.exitcode == 0
        after = db.stats()
        with db.snapshot() as snap:
            assert [snap.root[f"w{writer}"]["value"] for writer in range(writers)] == [commits - 1] * writers
    made = after.commits - before.commits
    syncs = after.wal_syncs - before.wal_syncs
    assert made == writers * commits
    assert syncs <= made * 0.75, f"{made} sync commits took {syncs} fsyncs: group commit did not group"


def _commit_one_sync(path: str) -> None:
    with open_test_db(path) as db:
        commit_counter(db, "sync", 1, durability="sync")


def test_an_async_commit_behind_a_slow_sync_one_is_not_shown_before_that_one_is_durable(
    datadir, monkeypatch, spawn_process
):
    # Every fdatasync takes 0.5 s more. The async commit's root holds the sync commit's data:
    # before, it was published (and answered) at once, so readers saw a commit a crash could take back.
    monkeypatch.setenv(FAULTS_ENV, "fsync_delay_ms=500")
    with open_test_db(datadir) as db:
        before = db.stats()
        writer = spawn_process(_commit_one_sync, datadir)
        wait_until(lambda: db.stats().seq == before.seq + 1, "the sync commit to be applied")
        applied = db.stats()  # its last_lsn is the sync commit's record
        commit_counter(db, "async", 2, durability="async")
        assert db.stats().durable_lsn >= applied.last_lsn, "the async commit returned before the sync one was durable"
        with db.snapshot() as snap:
            assert (snap.root["sync"]["value"], snap.root["async"]["value"]) == (1, 2)
        writer.join(timeout=60)
        assert writer.exitcode == 0


def _write_calls(pid: int) -> int:
    with open(f"/proc/{pid}/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("syscw:"))


def test_async_commits_do_not_wake_the_persistence_process_one_by_one(datadir):
    with open_test_db(datadir, durability="async", flush_interval=0.05) as db:
        commit_counter(db, "counter", 0)
        wait_until(lambda: db.stats().durable_lsn == 1, "the first commit to be fsynced")
        pid = db.stats().persistence_pid
        before = _write_calls(pid)
        for i in range(1, 301):
            commit_counter(db, "counter", i)
        wait_until(lambda: db.stats().durable_lsn == 301, "the async commits to be fsynced")
        writes = _write_calls(pid) - before
        assert db.stats().persistence_pid == pid
    # Waking it per commit wrote one batch per commit (300); it now drains on its flush timer.
    assert writes < 100, f"300 async commits took {writes} writes of the persistence process"
    assert read(datadir, "counter") == 300


def test_a_deleted_checkpoint_after_a_clean_stop_refuses_to_open_naming_the_gap(datadir, capsys):
    # The clean stop checkpoints at lsn 50 and starts wal-51; without the checkpoint the
    # WAL's LSNs are ahead of the state. This opened an empty database, and the next sync
    # commit hung: the persistence process skipped every new record as already written.
    with open_test_db(datadir) as db:
        for i in range(50):
            commit_counter(db, f"k{i}", i)
    assert wait_for_coordinator_exit(datadir)
    (checkpoint,) = [name for name in os.listdir(datadir) if name.startswith("checkpoint-")]
    aside = os.path.join(os.path.dirname(datadir), checkpoint)
    os.rename(os.path.join(datadir, checkpoint), aside)
    with pytest.raises(
        CorruptionError,
        match=r"WAL records 1\.\.50 are missing: recovery starts from an empty "
        r"database \(there is no checkpoint\), but the first WAL file, "
        r".*wal-0000000000000033\.log, starts at lsn 51\. A checkpoint-\*\.pb "
        r"or wal-\*\.log file moved or deleted does this: put it back",
    ):
        open_test_db(datadir)
    assert wait_for_coordinator_exit(datadir)

    destination = os.path.join(os.path.dirname(datadir), "salvaged")
    assert cli.main(["recover", datadir, destination]) == 0
    assert "LOST: WAL records 1..50 (damaged or missing), the commit after seq 0;" in capsys.readouterr().out
    assert salvaged_keys(destination) == []

    os.rename(aside, os.path.join(datadir, checkpoint))  # the remedy the error names
    with open_test_db(datadir) as db:
        commit_counter(db, "k50", 50)  # a sync commit: it returned, so it is durable
        with db.snapshot() as snap:
            assert sorted(snap.root, key=lambda key: int(key[1:])) == [f"k{i}" for i in range(51)]


# -- the persistence process's start-up, run in this process against a real ring and WAL ------------


@pytest.fixture
def instance(datadir):
    """(data directory, instance id, commit ring) as a coordinator makes them before it starts persistence."""
    directory = DataDir.open(datadir)
    instance_id = names.new_instance_id()
    control = ControlBlock.create(
        names.control_name(instance_id),
        reader_slots=1,
        coordinator_pid=os.getpid(),
        coordinator_start=process_start_time(),
    )
    ring = CommitRing.create(names.segment_name(instance_id, "ring"))
    try:
        yield directory, instance_id, ring
    finally:
        ring.unlink()
        ring.close()
        control.unlink()
        control.close()
        names.sweep(instance_id)


def write_history(directory: DataDir, payloads: list[bytes]) -> str:
    """A WAL file of these records from lsn 1, as a persistence process leaves it; its path."""
    with WalWriter.create(directory.path, 1) as writer:
        writer.append_many(payloads)
        writer.sync()
        return writer.path


def run_persistence(directory: DataDir, instance_id: str, *, next_lsn: int, last_lsn: int) -> tuple[int, list]:
    """Run a persistence process's main loop here until it drained the ring; (exit status, its reports)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        ours.shutdown(socket.SHUT_WR)  # the coordinator is gone: drain the ring, sync and exit
        status = Persistence(directory, instance_id, theirs, flush_interval=0.01).run(next_lsn, last_lsn)
        theirs.shutdown(socket.SHUT_WR)
        data = b"".join(iter(lambda: ours.recv(65536), b""))
    return status, FrameReader().feed(data)


def test_persistence_refuses_a_wal_ahead_of_the_state_instead_of_skipping_new_commits(instance):
    # The WAL of another history ends at lsn 5, the coordinator has handed out lsn 1 only:
    # skipping ring record 1 "as already written" lost it, and reporting lsn 5 durable
    # acknowledged it.
    directory, instance_id, ring = instance
    path = write_history(directory, [b"theirs %d" % lsn for lsn in range(1, 6)])
    ring.append(1, SYNC, b"ours 1")
    status, reports = run_persistence(directory, instance_id, next_lsn=1, last_lsn=1)
    assert status == EXIT_DISK_FAILURE
    assert reports == [
        [
            "failed",
            f"CorruptionError: WAL file {path} ends at lsn 5, past lsn 1, the last commit of "
            f"the state being served: the WAL belongs to a later state (was a "
            f"checkpoint-*.pb file moved or deleted?); put the missing file back, or salvage "
            f"with `protobase recover {directory.path} NEW_DIR`",
        ]
    ]
    assert list(read_records(path)) == [(lsn, b"theirs %d" % lsn) for lsn in range(1, 6)]


def test_persistence_skips_a_ring_record_only_if_the_wal_holds_that_very_record(instance):
    # A predecessor wrote lsn 3 and died before its fsync was reported: the ring's copy is
    # skipped only once it matches the record read back, and a different one stops us.
    directory, instance_id, ring = instance
    path = write_history(directory, [b"commit 1", b"commit 2", b"commit 3"])
    ring.append(3, SYNC, b"commit 3")
    ring.append(4, SYNC, b"commit 4")
    status, reports = run_persistence(directory, instance_id, next_lsn=3, last_lsn=4)
    assert (status, reports) == (0, [["started", 3], ["durable", 4]])
    assert [payload for _, payload in read_records(path)] == [b"commit 1", b"commit 2", b"commit 3", b"commit 4"]

    ring.append(5, SYNC, b"commit 5")
    with WalWriter.open_for_append(path) as writer:  # what another history put there meanwhile
        writer.append(b"not commit 5")
        writer.sync()
    status, reports = run_persistence(directory, instance_id, next_lsn=5, last_lsn=5)
    assert status == EXIT_DISK_FAILURE
    assert reports[-1] == [
        "failed",
        f"CorruptionError: WAL file {path} holds a record 5 that is not the commit 5 "
        f"being written: the WAL belongs to another history; the database must stop "
        f"and recover (`protobase recover`)",
    ]


# -- the coordinator's side: Durability with a real persistence process ------------------------------------


@contextlib.contextmanager
def started_durability(path: str, **options) -> Iterator[Durability]:
    """A started Durability (ring and persistence process) on a fresh directory, as a coordinator has it."""
    directory = DataDir.open(path)
    instance_id = names.new_instance_id()
    control = ControlBlock.create(
        names.control_name(instance_id),
        reader_slots=1,
        coordinator_pid=os.getpid(),
        coordinator_start=process_start_time(),
    )
    supervisor = Durability(directory, instance_id, control, next_lsn=1, flush_interval=0.01, **options)
    try:
        supervisor.start()
        supervisor.wait_started()
        yield supervisor
    finally:
        supervisor.stop()
        control.unlink()
        control.close()
        names.sweep(instance_id)


@pytest.fixture
def durability(datadir):
    with started_durability(datadir) as supervisor:
        yield supervisor


@pytest.fixture
def full_disk(monkeypatch):
    """The persistence processes started from now on find room for 100 bytes of WAL (its header included)."""
    monkeypatch.setenv(FAULTS_ENV, "enospc_after=100")


def test_a_failed_wal_write_refuses_the_next_async_commit_before_its_report_is_read(full_disk, durability):
    # An async commit is acknowledged once handed over: until the coordinator's event loop got
    # to the persistence process's report, every commit handed over was acknowledged and lost.
    durability.enqueue(b"x" * 4096, sync=False)  # everything before it is durable: it rings the doorbell
    wait_until(lambda: durability.process.poll() is not None, "the persistence process to stop on the full disk")
    with pytest.raises(
        DurabilityFailed,
        match="the write-ahead log failed: WalWriteError: cannot write 1 record"
        r"\(s\) from lsn 1 .*No space left on device",
    ):
        durability.enqueue(b"y", sync=False)
    assert durability.next_lsn == 2  # the refused commit got no LSN


def kill_persistence(supervisor: Durability) -> None:
    supervisor.process.kill()
    supervisor.process.wait(timeout=10)


def test_persistence_restarts_are_limited_within_a_window_not_over_a_lifetime(datadir, monkeypatch):
    # The cap counted every death of a coordinator's life: deaths months apart stopped the
    # database at the 21st. A fake clock stands in for the months.
    monkeypatch.setattr(durability_module, "RESTART_LIMIT", 2)
    now = [0.0]
    with started_durability(datadir, clock=lambda: now[0]) as supervisor:
        for _ in range(4):  # twice the limit, a day apart
            kill_persistence(supervisor)
            assert supervisor.check_child()
            supervisor.wait_started()
            now[0] += 86_400
        for _ in range(2):  # a crash loop: the limit within the window...
            kill_persistence(supervisor)
            assert supervisor.check_child()
            supervisor.wait_started()
            now[0] += 1
        kill_persistence(supervisor)  # ...and one more
        with pytest.raises(
            DurabilityFailed,
            match=r"the persistence process died 3 times within 300s \(last exit "
            r"status -9\); see .*coordinator\.log",
        ):
            supervisor.check_child()
        assert not supervisor.check_child()  # failed for good: no restart, no second report


def test_a_commit_waiting_for_room_in_the_ring_wakes_the_persistence_process(durability, monkeypatch):
    # Everything is durable, so the persistence process sleeps (up to a second). A record
    # three times the ring's size fills it before it is whole: the producer must ring while
    # it waits, or each ringful waited out that sleep (a bulk load of 1M records: 1.6 s of 16).
    def durable(lsn: int) -> bool:
        durability.read_reports()  # takes note of the durable LSN reported
        return durability.durable_lsn >= lsn

    durability.enqueue(b"first", sync=True)
    wait_until(lambda: durable(1), "the first record to be durable")
    rung_while_full: list[int] = []
    ring_doorbell = durability.doorbell

    def doorbell() -> None:
        rung_while_full.append(durability.ring.head - durability.ring.tail)
        ring_doorbell()

    monkeypatch.setattr(durability, "doorbell", doorbell)
    durability.enqueue(b"x" * (3 * durability.ring.capacity), sync=False)
    assert len(rung_while_full) > 1, "the producer waited for room without waking the consumer"
    wait_until(lambda: durable(2), "the big record to be durable")


RELEASE_AFTER = 30.0  # seconds after which a held checkpoint is let go whatever the test found


@pytest.fixture
def checkpoint_gate(datadir, monkeypatch):
    """A file that holds the checkpoints of the persistence processes started from now on while it exists.

    `released(gate)` removes it on exit, before the processes are stopped
    (they finish the checkpoint they write before they exit), and at the
    latest after RELEASE_AFTER seconds: code that waits for a held
    checkpoint then fails its test instead of hanging it.
    """
    gate = os.path.join(os.path.dirname(datadir), "checkpoint-gate")
    open(gate, "w").close()
    monkeypatch.setenv(CHECKPOINT_GATE_ENV, gate)
    yield gate
    with contextlib.suppress(FileNotFoundError):
        os.unlink(gate)


@contextlib.contextmanager
def released(gate: str) -> Iterator[None]:
    timer = threading.Timer(RELEASE_AFTER, lambda: os.path.exists(gate) and os.unlink(gate))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(gate)


def reported(supervisor: Durability) -> Durability:
    supervisor.read_reports()  # takes note of durable LSNs and of requests written
    return supervisor


def test_commits_flow_into_the_wal_while_a_checkpoint_is_written(datadir, checkpoint_gate):
    # The persistence process wrote a checkpoint in its loop: for as long as that took (1-2 s
    # at 150 MB), it drained nothing, the ring filled and every commit waited for the disk
    # (benchmarks.compaction: a commit waited 860 ms, 3 ms at p99.9).
    with started_durability(datadir, ring_capacity=64 << 10) as supervisor, released(checkpoint_gate):
        supervisor.enqueue(b"before", sync=True)
        request = supervisor.request_checkpoint(seq=1, root=0, segments=[], next_segment=0)
        last = [supervisor.enqueue(b"x" * 4096, sync=False) for _ in range(64)][-1]  # four ringfuls
        wait_until(lambda: reported(supervisor).durable_lsn >= last, "the commits after the request to be durable")
        assert os.path.exists(checkpoint_gate), "the commits waited for the checkpoint to be written"
        assert checkpoint_files(datadir) == [] and request in supervisor.controls
        os.unlink(checkpoint_gate)
        wait_until(lambda: not reported(supervisor).controls, "the checkpoint to be reported written")
        assert [lsn for lsn, _ in checkpoint_files(datadir)] == [1]
        # What came while it was written went to a new WAL file; the file it covers is gone.
        assert [first for first, _ in list_wal_files(datadir)] == [2]
        assert [lsn for lsn, _ in read_records(list_wal_files(datadir)[0][1])] == list(range(2, last + 1))


def test_a_checkpoint_in_flight_when_its_writer_dies_is_written_by_the_next_persistence_process(
    datadir, checkpoint_gate
):
    # The control record leaves the ring as the checkpoint starts: killed before it is written,
    # its writer leaves it to no one unless the coordinator sends it again.
    with started_durability(datadir) as supervisor, released(checkpoint_gate):
        supervisor.enqueue(b"before", sync=True)
        request = supervisor.request_checkpoint(seq=1, root=0, segments=[], next_segment=0)
        wait_until(lambda: supervisor.ring.tail == supervisor.ring.head, "the request to be taken off the ring")
        kill_persistence(supervisor)
        assert supervisor.check_child()
        supervisor.wait_started()
        assert request in supervisor.controls
        supervisor.enqueue(b"after", sync=True)
        os.unlink(checkpoint_gate)
        wait_until(lambda: not reported(supervisor).controls, "the checkpoint to be reported written")
        wait_until(lambda: reported(supervisor).durable_lsn >= 2, "the commit after it to be durable")
        assert [lsn for lsn, _ in checkpoint_files(datadir)] == [1]
        assert list(read_directory(datadir, 1)) == [(2, b"after")]


def test_a_database_commits_and_recovers_while_a_checkpoint_is_held(datadir, checkpoint_gate):
    with released(checkpoint_gate):
        with open_test_db(datadir) as db:
            commit_counter(db, "counter", 0, durability="sync")
            db.checkpoint()
            for i in range(1, 1001):  # 8 MB of WAL: twice the commit ring
                with db.transaction(durability="async") as tx:
                    tx.root[f"blob{i % 10}"] = "x" * 8192
                    tx.root["counter"] = {"value": i}
            assert os.path.exists(checkpoint_gate), "the commits waited for the checkpoint to be written"
            os.unlink(checkpoint_gate)
            wait_until(lambda: db.stats().checkpoints == 1, "the checkpoint to be written")
    assert wait_for_coordinator_exit(datadir)
    assert read(datadir, "counter") == 1000
