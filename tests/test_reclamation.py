"""Reclamation: compaction frees shared memory, snapshots pin it, dead readers stop pinning it.

The coordinator compacts by copying live atoms into fresh segments and unlinks
the old ones once no reader's snapshot can reach them (coordinator/reclamation.py). These tests
watch that from outside, through `db.stats()` (reader table, data bytes) and
the instance's entries in /dev/shm:

- a reader killed with SIGKILL while it holds a snapshot is dropped from the
  reader table and its pinned segments are unlinked;
- a live snapshot keeps its segments (and reads correct data) across
  compactions, and they go once it closes;
- sustained updates on a fixed key set keep memory bounded;
- a stopped reader (SIGSTOP) that pins a snapshot makes memory grow with the
  bytes written, no faster, and `stats().oldest_reader` names it.

Databases are opened with a small `compact_min_bytes` so compactions happen
after about a megabyte of garbage, and with async durability: the WAL is not
what these tests are about. Waits poll a condition with a deadline.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

import protobase
from protobase.cli import main as cli
from protobase.core import codec
from protobase.shm import names
from tests.conftest import open_test_db, served, wait_until

SPAWN = multiprocessing.get_context("spawn")
DEADLINE = 60.0  # seconds any one wait may take before the test fails
COMPACT_MIN = 1 << 20
SPACE_FACTOR = 8  # peak data bytes stay under this multiple of max(live bytes, COMPACT_MIN)
DATA_SEGMENT = re.compile(r"\.d[0-9]+$")


def open_db(path: str) -> protobase.Database:
    return open_test_db(path, compact_min_bytes=COMPACT_MIN, durability="async")


def data_segments(db: protobase.Database) -> set[str]:
    """The names of the instance's data segments present in /dev/shm."""
    return {entry for entry in names.instance_entries(db.instance_id) if DATA_SEGMENT.search(entry)}


def fill(db: protobase.Database, count: int) -> dict:
    records = {f"key{i:05d}": {"n": 0, "v": i} for i in range(count)}
    with db.transaction() as tx:
        tx.root["d"] = records
    return records


def update_round(db: protobase.Database, keys: list[str], rng: random.Random, number: int, count: int = 200) -> None:
    with db.transaction() as tx:
        records = tx.root["d"]
        for key in rng.sample(keys, count):
            records[key] = {"n": number, "v": key}


def update_until_compacted(db: protobase.Database, keys: list[str], rng: random.Random, compactions: int) -> int:
    """Run update rounds until `compactions` more compactions happened; return the rounds run."""
    target = db.stats().compactions + compactions
    rounds = 0
    deadline = time.monotonic() + DEADLINE
    while db.stats().compactions < target:
        assert time.monotonic() < deadline, "no compaction happened under sustained updates"
        update_round(db, keys, rng, rounds)
        rounds += 1
    return rounds


# -- children ----------------------------------------------------------------------------------------


@pytest.fixture
def children(spawn_process) -> Callable[..., Any]:
    """start(target, *args): a spawned child, killed (if needed) and joined afterwards."""
    return spawn_process


def _pin_and_report(path: str, reports: Any) -> tuple[protobase.Database, protobase.Snapshot]:
    try:
        db = open_db(path)
        snapshot = db.snapshot()
        reports.put(("ok", os.getpid(), snapshot.seq))
    except BaseException:
        reports.put(("error", os.getpid(), traceback.format_exc()))
        raise
    return db, snapshot


def _pin_until_killed(path: str, reports: Any) -> None:
    _db, _snapshot = _pin_and_report(path, reports)  # held while we sleep
    time.sleep(10 * DEADLINE)  # the parent kills us with SIGKILL, snapshot held


def _pin_until_released(path: str, reports: Any, release: Any) -> None:
    db, snapshot = _pin_and_report(path, reports)
    assert release.wait(10 * DEADLINE), "the parent never released us"
    snapshot.close()
    db.close()


# -- tests ---------------------------------------------------------------------------------------------


def test_reader_killed_while_holding_a_snapshot_stops_pinning(datadir, children):
    rng = random.Random(1)
    with open_db(datadir) as db:
        keys = sorted(fill(db, 2000))
        reports = SPAWN.Queue()
        child = children(_pin_until_killed, datadir, reports)
        status, pid, seq = reports.get(timeout=DEADLINE)
        assert status == "ok", seq
        assert any(r.pid == pid and r.snapshot_seq == seq for r in db.stats().readers)
        pinned = data_segments(db)

        update_until_compacted(db, keys, rng, 1)
        db.compact()  # automatic compactions wait for the snapshot to let go; an explicit one runs
        assert pinned <= data_segments(db), "segments a live snapshot can reach were unlinked"

        os.kill(pid, signal.SIGKILL)  # our own child
        child.join(DEADLINE)
        assert child.exitcode == -signal.SIGKILL

        wait_until(lambda: all(r.pid != pid for r in db.stats().readers), "the dead reader to leave the table")
        update_until_compacted(db, keys, rng, 1)
        wait_until(lambda: not pinned & data_segments(db), "the segments the dead reader pinned to be unlinked")
        db.compact()
        stats = db.stats()
        assert stats.data_bytes <= SPACE_FACTOR * max(stats.live_bytes, COMPACT_MIN), stats
        db.check()


def test_live_snapshot_pins_segments_until_closed(datadir):
    rng = random.Random(2)
    with open_db(datadir) as db:
        records = fill(db, 2000)
        keys = sorted(records)
        snapshot = db.snapshot()
        pinned = data_segments(db)
        assert pinned

        update_until_compacted(db, keys, rng, 1)
        db.compact()  # automatic compactions wait for the snapshot to let go; explicit ones run
        db.compact()
        assert pinned <= data_segments(db), "segments a live snapshot can reach were unlinked"
        # The old snapshot still reads its own version, through the old segments.
        assert snapshot.root["d"]["key00007"] == {"n": 0, "v": 7}
        assert snapshot.root.thaw() == {"d": records}
        db.check()

        snapshot.close()
        wait_until(lambda: not pinned & data_segments(db), "the unpinned segments to be unlinked")
        with db.snapshot() as fresh:
            assert len(fresh.root["d"]) == len(keys)
            assert any(record["n"] > 0 for record in fresh.root["d"].values())
        db.check()


def test_sustained_updates_keep_memory_bounded(datadir):
    rng = random.Random(3)
    rounds = 320
    with open_db(datadir) as db:
        keys = sorted(fill(db, 10_000))
        data_peaks, shared_peaks = [], []
        for number in range(rounds):
            update_round(db, keys, rng, number)
            stats = db.stats()
            data_peaks.append(stats.data_bytes)
            shared_peaks.append(stats.shared_bytes)
        db.compact()
        wait_until(lambda: db.stats().segments == len(data_segments(db)), "retired segments to be unlinked")
        stats = db.stats()
        assert stats.compactions > 0
        overhead = stats.shared_bytes - stats.data_bytes  # control block and other fixed segments
        bound = SPACE_FACTOR * max(stats.live_bytes, COMPACT_MIN)
        assert max(data_peaks) <= bound, (max(data_peaks), stats)
        assert max(shared_peaks) - overhead <= bound, (max(shared_peaks), overhead, stats)
        # No growth with the number of rounds: the second half peaks no higher than the first.
        half = rounds // 2
        assert max(data_peaks[half:]) <= 1.5 * max(data_peaks[:half]), (data_peaks[:half], data_peaks[half:])
        assert max(shared_peaks[half:]) <= 1.5 * max(shared_peaks[:half])
        with db.snapshot() as snapshot:
            assert len(snapshot.root["d"]) == len(keys)
        db.check()


REWRITTEN = 16 << 20  # bytes of values the parent writes while a stopped reader pins a snapshot
GROWTH_FACTOR = 2  # shared memory may grow by at most this multiple of them
VALUE_BYTES = 8 << 10


def rewrite(db: protobase.Database, keys: list[str], number: int) -> int:
    """Replace an eighth of the values under "d" (64 kB); return the bytes written."""
    with db.transaction() as tx:
        for key in keys[number % 8 :: 8]:
            tx.root["d"][key] = f"{number}".ljust(VALUE_BYTES, "x")
    return len(keys) // 8 * VALUE_BYTES


def test_a_stopped_reader_makes_memory_grow_with_the_bytes_written_and_is_named(datadir, children, capsys):
    keys = [f"key{i:02d}" for i in range(64)]
    with open_db(datadir) as db:
        with db.transaction() as tx:
            tx.root["d"] = {key: "0" * VALUE_BYTES for key in keys}
        reports, release = SPAWN.Queue(), SPAWN.Event()
        child = children(_pin_until_released, datadir, reports, release)
        status, pid, seq = reports.get(timeout=DEADLINE)
        assert status == "ok", seq
        before = db.stats().shared_bytes
        os.kill(pid, signal.SIGSTOP)  # alive, so never reaped: its snapshot stays pinned
        try:
            written, peak, number = 0, before, 0
            while written < REWRITTEN:
                number += 1
                written += rewrite(db, keys, number)
                peak = max(peak, db.stats().shared_bytes)
            stats = db.stats()
            assert cli.main(["status", datadir, "--interval", "0"]) == 0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert peak - before <= GROWTH_FACTOR * written, (peak - before, written, stats)
        oldest = stats.oldest_reader
        assert (oldest.pid, oldest.snapshot_seq) == (pid, seq), stats
        assert oldest.held_seconds > 0 and oldest.retained_bytes >= COMPACT_MIN, oldest
        assert re.search(
            rf"oldest snapshot: pid {pid} \(slot \d+\) has held seq {seq} for \d+\.\ds, keeping "
            rf"\d+\.\d MiB of retired segments in shared memory",
            capsys.readouterr().out,
        )

        release.set()
        child.join(DEADLINE)
        assert child.exitcode == 0
        wait_until(lambda: db.stats().oldest_reader is None, "the reader to let go of its snapshot")
        compactions = db.stats().compactions
        while db.stats().compactions == compactions:  # automatic compactions resume
            number += 1
            rewrite(db, keys, number)
            assert number < 10_000, "no compaction once the reader let go"
        wait_until(lambda: small(db.stats()), "the segments the reader pinned to be unlinked")
        db.check()


def small(stats: protobase.DatabaseStats) -> bool:
    """True when the data segments hold little more than the live data."""
    return stats.data_bytes <= SPACE_FACTOR * max(stats.live_bytes, COMPACT_MIN)


# -- Reclamation itself (coordinator/reclamation.py), on the commit harness of test_commits.py ----------------


class Pins:
    """Stands for the checkpoints in flight: the seqs they pin."""

    def __init__(self) -> None:
        self.seqs: list[int] = []

    def pinned_seqs(self) -> list[int]:
        return list(self.seqs)


@pytest.fixture
def parts() -> Any:
    from protobase.coordinator.reclamation import Reclamation
    from tests.test_commits import Harness

    harness = Harness()
    pins = Pins()
    reclamation = Reclamation(
        harness.arena,
        harness.writer,
        harness.control,
        harness.commits,  # type: ignore[arg-type]
        pins,
        compact_min_bytes=64 << 10,
    )
    yield harness, pins, reclamation
    harness.close()


def garbage(harness: Any, count: int) -> None:
    """`count` async commits, each replacing an 8 KB value: about 8 KB of garbage each."""
    from protobase.wire.opcodes import OP_SET

    for number in range(count):
        harness.commit("writer", [OP_SET, ["blob"], f"{number}:" + "x" * 8000], [OP_SET, ["n"], number])


def all_durable(harness: Any) -> None:
    harness.durability.durable_lsn = harness.durability.next_lsn - 1
    harness.commits.answer_durable()


def test_a_compaction_starts_once_the_garbage_passes_the_threshold_and_not_while_a_reader_pins_the_last(parts):
    from protobase.shm.control import ReaderSlot

    harness, _, reclamation = parts
    garbage(harness, 5)  # ~40 KB: under compact_min_bytes
    all_durable(harness)
    reclamation.maybe_compact()
    assert reclamation.compactions == 0
    garbage(harness, 5)
    all_durable(harness)
    harness.control.reader_slots = [ReaderSlot(0, 1, 0.0, 3)]  # a reader on an old snapshot
    reclamation.maybe_compact()
    assert reclamation.compactions == 1 and harness.commits.seq == 11 and harness.control.published[-1][0] == 11
    ((retired_seq, first_live),) = reclamation.retired
    assert retired_seq == 11 and min(harness.arena.segments) < first_live  # kept for the reader
    garbage(harness, 20)
    all_durable(harness)
    reclamation.maybe_compact()
    assert reclamation.compactions == 1  # another copy could free nothing while the reader holds the first
    harness.control.reader_slots = []
    reclamation.release_retired()
    assert reclamation.retired == [] and min(harness.arena.segments) == first_live
    assert harness.control.oldest_segment == first_live
    reclamation.maybe_compact()
    assert reclamation.compactions == 2 and reclamation.live_bytes() < 16 << 10


def test_retired_segments_wait_for_the_copy_to_be_published_and_for_checkpoints_in_flight(parts):
    from protobase.wire.opcodes import OP_SET

    harness, pins, reclamation = parts
    garbage(harness, 3)
    harness.commit("sync", [OP_SET, ["k"], 1], durability="sync")  # not durable yet: the copy waits behind it
    pins.seqs = [2]  # and a checkpoint of seq 2 is being written
    reclamation.compact()
    ((seq, first_live),) = reclamation.retired
    assert harness.commits.published_seq < seq
    harness.durability.durable_lsn = harness.durability.next_lsn - 1
    harness.commits.answer_durable()  # the copy is published: only the checkpoint holds the old segments now
    assert harness.commits.published_seq == seq
    reclamation.release_retired()
    assert reclamation.retired and min(harness.arena.segments) < first_live
    pins.seqs = []
    reclamation.release_retired()
    assert not reclamation.retired and min(harness.arena.segments) == first_live


def test_a_failed_compaction_is_undone_and_the_next_attempt_waits_for_as_many_bytes_again(parts, monkeypatch, caplog):
    import logging

    from protobase.errors import ProtoBaseError

    harness, _, reclamation = parts
    garbage(harness, 10)
    all_durable(harness)
    segments, seq, root = dict(harness.arena.segments), harness.commits.seq, harness.commits.root
    attempts = []

    def no_room(root: int) -> int:
        attempts.append(root)
        harness.arena.append(1, b"y" * 1000)  # half a copy in the new generation
        raise ProtoBaseError("/dev/shm is full")

    monkeypatch.setattr(harness.writer, "copy_root", no_room)
    with caplog.at_level(logging.ERROR, logger="protobase.coordinator"):
        reclamation.maybe_compact()
    assert [record.getMessage() for record in caplog.records] == [
        "compaction failed and was undone; serving the uncompacted data, next attempt after 65536 more bytes: "
        "compaction failed and was undone, the database is unchanged: /dev/shm is full"
    ]
    assert (reclamation.compaction_failures, reclamation.compactions, len(attempts)) == (1, 0, 1)
    assert (harness.commits.seq, harness.commits.root) == (seq, root) and reclamation.retired == []
    assert set(harness.arena.segments) == set(segments)  # the half-made copy is unlinked
    garbage(harness, 4)  # ~32 KB more: under the 64 KiB to wait for
    reclamation.maybe_compact()
    assert len(attempts) == 1
    garbage(harness, 6)
    reclamation.maybe_compact()
    assert len(attempts) == 2
    with pytest.raises(
        ProtoBaseError, match="^compaction failed and was undone, the database is unchanged: /dev/shm is full$"
    ):
        reclamation.compact()  # asked for (db.compact()): the error goes to the asker


def test_oldest_reader_names_the_reader_of_the_oldest_snapshot_and_what_it_keeps(parts):
    from protobase.shm.control import ReaderSlot

    harness, _, reclamation = parts
    garbage(harness, 3)
    all_durable(harness)
    assert reclamation.oldest_reader() is None
    harness.control.reader_slots = [ReaderSlot(3, 77, 0.0, 3), ReaderSlot(4, 78, 0.0, 2)]
    reclamation.observe_pins()
    reclamation.compact()
    ((_, first_live),) = reclamation.retired
    time.sleep(0.05)
    oldest = reclamation.oldest_reader()
    assert oldest is not None and (oldest["slot"], oldest["pid"], oldest["snapshot_seq"]) == (4, 78, 2)
    assert oldest["held_seconds"] >= 0.05
    assert oldest["retained_bytes"] == harness.arena.bytes_below(first_live) > 0
    harness.control.reader_slots = [ReaderSlot(3, 77, 0.0, 3), ReaderSlot(4, 78, 0.0, 4)]  # moved on
    oldest = reclamation.oldest_reader()
    assert oldest is not None and oldest["slot"] == 3 and oldest["held_seconds"] >= 0.05
    harness.control.reader_slots = [ReaderSlot(3, 79, 0.0, 3)]  # another process in that slot: a new pin
    oldest = reclamation.oldest_reader()
    assert oldest is not None and oldest["pid"] == 79 and oldest["held_seconds"] < 0.05


# -- compactions in steps ----------------------------------------------------------------------------


@pytest.fixture
def stepping(parts: Any, monkeypatch: Any) -> Any:
    """The parts with every automatic compaction made in steps, each as small as can be: a node or a replay."""
    from protobase.coordinator import reclamation as reclamation_module

    harness, pins, reclamation = parts
    reclamation.compact_in_steps_above = 0
    monkeypatch.setattr(reclamation_module, "STEPS_BETWEEN_CLOCK_READS", 1)
    monkeypatch.setattr(reclamation_module, "COMPACTION_STEP_SECONDS", 0.0)
    return harness, reclamation


def step(reclamation: Any) -> None:
    """One step of the running compaction, due now (the loop would wait while commits come)."""
    reclamation.running.next_step_at = 0.0
    reclamation.advance()


def pointers_below(harness: Any, root: int, segment: int) -> list[int]:
    """Every atom reachable from `root` that lies in a segment before `segment`."""
    from protobase.core.arena import segment_of

    found = []

    def visit(ptr: int, kind: int) -> None:
        if segment_of(ptr) < segment:
            found.append(ptr)
        payload = harness.writer.store.reader.atom(ptr)[1]
        codec.decode(payload, frozen=False, opaque_dataclasses=True, ref=lambda p, k: visit(p, k) if p else None)

    visit(root, 0)
    return found


def test_a_compaction_in_steps_replays_the_commits_made_meanwhile_and_then_becomes_the_root(stepping):
    from protobase.wire.opcodes import OP_SET

    harness, reclamation = stepping
    harness.commit("fill", [OP_SET, ["users"], {f"u{i:04d}": {"n": i} for i in range(3000)}])
    garbage(harness, 10)
    all_durable(harness)
    reclamation.maybe_compact()
    assert reclamation.running is not None and reclamation.compactions == 0
    first_new = reclamation.running.first_new
    steps = 0
    while reclamation.running is not None:
        step(reclamation)
        steps += 1
        if steps % 7 == 0 and steps < 400:  # commits between the steps, the copy's and the catch-up's
            harness.commit("w", [OP_SET, ["users", f"u{steps:04d}"], {"n": -steps}], [OP_SET, ["n"], steps])
    assert steps > 50 and reclamation.compactions == 1
    all_durable(harness)
    assert harness.control.published[-1] == (harness.commits.seq, harness.commits.root)
    users = harness.read("users")
    assert [users[f"u{i:04d}"]["n"] for i in (1, 7, 14, 399, 2999)] == [1, -7, -14, 399, 2999]
    assert harness.read("n") == max(s for s in range(7, 400, 7) if s <= steps)
    assert pointers_below(harness, harness.commits.root, first_new) == []  # nothing left in the old segments
    reclamation.release_retired()
    assert min(harness.arena.segments) == first_new
    assert harness.arena.generation()[0][0] == first_new


def test_a_checkpoint_taken_while_a_compaction_runs_in_steps_holds_the_old_segments_too(stepping):
    harness, reclamation = stepping
    garbage(harness, 10)
    all_durable(harness)
    before = {index for index, _ in harness.arena.generation()}
    reclamation.maybe_compact()
    step(reclamation)
    assert reclamation.running is not None
    assert before <= {index for index, _ in harness.arena.generation()}  # the latest root still points there


def test_a_compaction_in_steps_that_fails_leaves_the_data_as_it_is(stepping, monkeypatch, caplog):
    import logging

    from protobase.errors import ProtoBaseError

    harness, reclamation = stepping
    garbage(harness, 10)
    all_durable(harness)
    seq, root = harness.commits.seq, harness.commits.root

    def no_room(root: int) -> Any:
        yield
        harness.arena.append(1, b"y" * 1000)
        raise ProtoBaseError("/dev/shm is full")

    monkeypatch.setattr(harness.writer, "copy_steps", no_room)
    reclamation.maybe_compact()
    with caplog.at_level(logging.ERROR, logger="protobase.coordinator"):
        while reclamation.running is not None:
            step(reclamation)
    assert [record.getMessage() for record in caplog.records] == [
        "compaction failed and was abandoned; serving the uncompacted data, next attempt after 65536 more bytes: "
        "/dev/shm is full"
    ]
    assert (reclamation.compaction_failures, reclamation.compactions, reclamation.retired) == (1, 0, [])
    assert (harness.commits.seq, harness.commits.root, harness.commits.recording) == (seq, root, None)
    garbage(harness, 4)  # under the 64 KiB to wait for
    reclamation.maybe_compact()
    assert reclamation.running is None


def test_an_explicit_compaction_drops_one_in_steps_and_copies_at_once(stepping):
    harness, reclamation = stepping
    garbage(harness, 10)
    all_durable(harness)
    reclamation.maybe_compact()
    step(reclamation)
    reclamation.compact()
    assert reclamation.running is None and reclamation.compactions == 1 and harness.commits.recording is None
    assert harness.read("n") == 9


def test_a_served_database_compacts_in_steps_while_it_commits(datadir):
    with served(datadir, "--compact-min-bytes", str(COMPACT_MIN), "--compact-in-steps-above", "0") as server:
        with open_test_db(datadir, durability="async") as db:
            keys = sorted(fill(db, 10_000))
            rng = random.Random(5)
            update_until_compacted(db, keys, rng, 2)
            with db.snapshot() as snap:
                assert len(snap.root["d"]) == len(keys)
                newest = db.stats().seq
            update_round(db, keys, rng, newest)
            with db.snapshot() as snap:
                assert sum(record["n"] == newest for record in snap.root["d"].values()) == 200
            db.check()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=DEADLINE) == 0
