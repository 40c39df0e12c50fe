"""Tests of protobase.shm: names, segments and the control block, on real segments and processes.

Every test works inside a fresh instance id and the `iid` fixture sweeps it
afterwards, checking nothing was left in /dev/shm. Child processes are
started with the "spawn" context (nothing inherited but what we pass), run
in their own process group, and are always joined or killed.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import pytest

from protobase.errors import (
    CoordinatorError,
    CorruptionError,
    DatabaseClosedError,
    ProtoBaseError,
)
from protobase.shm import (
    HEADER_SIZE,
    NO_SNAPSHOT,
    SLOT_SIZE,
    ControlBlock,
    ReaderSlot,
    Segment,
    control_name,
    data_name,
    instance_entries,
    is_instance_id,
    new_instance_id,
    segment_name,
    sweep,
)
from protobase.shm.segment import FAULTS_ENV

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def iid() -> Iterator[str]:
    """A fresh instance id; everything of that instance is unlinked afterwards."""
    instance = new_instance_id()
    try:
        yield instance
    finally:
        leftovers = sweep(instance)
        assert instance_entries(instance) == []
        # Tests unlink what they create; a sweep that found something is a leak.
        assert leftovers == [], f"test left segments behind: {leftovers}"


@pytest.fixture
def start_process(spawn_process) -> Callable[..., Any]:
    """Start spawn-context processes in their own process group; each is killed (if needed) and joined afterwards."""

    def start(target: Callable[..., None], *args: object) -> Any:
        return spawn_process(_in_own_group, target, *args)

    return start


def _in_own_group(target: Callable[..., None], *args: object) -> None:
    # Its own process group, so a runaway child can be killed as a group.
    os.setpgid(0, 0)
    target(*args)


def _shm_path(name: str) -> str:
    return os.path.join("/dev/shm", name.lstrip("/"))


def _new_control(iid: str, slots: int = 8) -> ControlBlock:
    return ControlBlock.create(
        control_name(iid),
        reader_slots=slots,
        coordinator_pid=os.getpid(),
        coordinator_start=psutil.Process().create_time(),
    )


# -- names ------------------------------------------------------------------


def test_instance_ids_are_128_random_bits() -> None:
    ids = {new_instance_id() for _ in range(100)}
    assert len(ids) == 100
    for instance in ids:
        assert len(instance) == 32 and is_instance_id(instance)
        int(instance, 16)
    assert not is_instance_id("0" * 31)
    assert not is_instance_id("A" * 32)
    assert not is_instance_id(None)


def test_names_follow_the_scheme() -> None:
    instance = "ab" * 16
    assert control_name(instance) == f"/protobase.{instance}.ctl"
    assert data_name(instance, 17) == f"/protobase.{instance}.d17"
    assert segment_name(instance, "ring") == f"/protobase.{instance}.ring"
    with pytest.raises(ValueError, match="32 lowercase hex"):
        control_name("../etc")
    with pytest.raises(ValueError, match="non-negative"):
        data_name(instance, -1)
    with pytest.raises(ValueError, match="suffix"):
        segment_name(instance, "a.b")


def test_sweep_removes_one_instance_and_nothing_else(iid: str) -> None:
    other = new_instance_id()
    mine = [control_name(iid), data_name(iid, 0), data_name(iid, 1), segment_name(iid, "ring")]
    try:
        for name in mine:
            Segment.create(name, 4096).close()
        Segment.create(control_name(other), 4096).close()

        assert sweep(iid) == sorted(mine)
        assert instance_entries(iid) == []
        assert instance_entries(other) == [control_name(other)]
        assert control_name(other) in instance_entries()
        assert sweep(iid) == []
    finally:
        sweep(other)
    assert instance_entries(other) == []


# -- segments ---------------------------------------------------------------


def test_create_is_zeroed_mode_0600_and_closes_cleanly(iid: str) -> None:
    name = data_name(iid, 0)
    segment = Segment.create(name, 10000)
    try:
        mode = os.stat(_shm_path(name)).st_mode
        assert stat.S_IMODE(mode) == 0o600
        assert os.stat(_shm_path(name)).st_size == 10000
        assert segment.size == 10000 and segment.writable
        assert bytes(segment.buf[:16]) == bytes(16)
        assert repr(segment) == f"<Segment {name} size=10000 open read-write>"
        segment.close()
        segment.close()  # idempotent
        assert repr(segment) == f"<Segment {name} size=10000 closed>"
        with pytest.raises(DatabaseClosedError, match="is closed"):
            segment.buf  # noqa: B018
    finally:
        assert segment.unlink()
    assert not segment.unlink()  # already gone


def test_mode_is_0600_whatever_the_umask(iid: str) -> None:
    name = data_name(iid, 0)
    old = os.umask(0o277)  # would give 0400: the coordinator could not reopen it
    try:
        segment = Segment.create(name, 4096)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(_shm_path(name)).st_mode) == 0o600
    finally:
        segment.close()
        segment.unlink()


def test_create_is_exclusive(iid: str) -> None:
    name = data_name(iid, 0)
    segment = Segment.create(name, 4096)
    try:
        segment.buf[0] = 42
        with pytest.raises(ProtoBaseError, match=f"segment {name} already exists"):
            Segment.create(name, 4096)
        assert segment.buf[0] == 42  # the failed create neither truncated nor unlinked it
        assert instance_entries(iid) == [name]
    finally:
        segment.close()
        segment.unlink()


def test_create_on_full_shm_fails_cleanly(iid: str) -> None:
    name = data_name(iid, 0)
    size = 1 << 50
    with pytest.raises(ProtoBaseError, match=r"shared memory \(/dev/shm\) is full") as info:
        Segment.create(name, size)
    assert f"{size} bytes" in str(info.value)
    assert "raise the tmpfs size" in str(info.value)
    assert instance_entries(iid) == []


def test_an_injected_full_shm_refuses_reservations_past_its_budget(iid: str, monkeypatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, f"enospc_after={3 << 16}")
    first = Segment.create(data_name(iid, 1), 2 << 16)
    try:
        with pytest.raises(
            ProtoBaseError,
            match=r"shared memory \(/dev/shm\) is full: could not reserve 131072 "
            r"bytes .*\(injected\)",
        ):
            Segment.create(data_name(iid, 2), 2 << 16)
        assert instance_entries(iid) == [first.name]
        Segment.create(data_name(iid, 3), 1 << 16).unlink()  # what is left of the budget
        monkeypatch.setenv(FAULTS_ENV, "enospc_after")
        with pytest.raises(ValueError, match=f"{FAULTS_ENV}='enospc_after': cannot parse it"):
            Segment.create(data_name(iid, 4), 1 << 16)
    finally:
        first.close()
        first.unlink()


def test_attach_read_only_cannot_write(iid: str) -> None:
    name = data_name(iid, 0)
    owner = Segment.create(name, 4096)
    try:
        owner.buf[:5] = b"hello"
        reader = Segment.attach(name)
        try:
            assert not reader.writable and reader.size == 4096
            assert bytes(reader.buf[:5]) == b"hello"
            assert reader.buf.readonly
            with pytest.raises(TypeError):
                reader.buf[0] = 1
            owner.buf[0] = ord("j")  # the reader sees the owner's writes
            assert bytes(reader.buf[:5]) == b"jello"
        finally:
            reader.close()
        writer = Segment.attach(name, writable=True)
        try:
            writer.buf[0] = ord("y")
            assert bytes(owner.buf[:5]) == b"yello"
        finally:
            writer.close()
    finally:
        owner.close()
        owner.unlink()


def test_attach_missing_segment_says_coordinator_is_gone(iid: str) -> None:
    name = data_name(iid, 3)
    with pytest.raises(CoordinatorError) as info:
        Segment.attach(name)
    assert str(info.value) == (
        f"shared memory segment {name} is gone: the coordinator has exited or restarted, or compacted "
        f"it away after the snapshot that read this value was closed; take a new snapshot (a database "
        f"handle reattaches by itself)"
    )


def test_close_with_live_views_keeps_them_readable(iid: str) -> None:
    name = data_name(iid, 0)
    segment = Segment.create(name, 4096)
    try:
        segment.buf[:3] = b"abc"
        view = segment.buf[:3]  # like an atom held by a cache
        segment.close()  # must not raise, must not unmap under the view
        assert segment.closed
        assert bytes(view) == b"abc"
        view.release()
    finally:
        segment.unlink()


def test_unlink_keeps_existing_mappings(iid: str) -> None:
    name = data_name(iid, 0)
    owner = Segment.create(name, 4096)
    reader = Segment.attach(name)
    try:
        owner.buf[0] = 7
        owner.unlink()
        assert instance_entries(iid) == []
        assert reader.buf[0] == 7
        with pytest.raises(CoordinatorError):
            Segment.attach(name)
    finally:
        reader.close()
        owner.close()


# -- control block: format --------------------------------------------------


def test_control_create_and_attach_agree(iid: str) -> None:
    start = psutil.Process().create_time()
    ctl = _new_control(iid, slots=5)
    try:
        assert os.stat(_shm_path(ctl.name)).st_size == HEADER_SIZE + 5 * SLOT_SIZE
        ctl.next_segment = 4
        ctl.durable_lsn = 123456789
        ctl.oldest_segment = 2
        ctl.publish_root(9, 0xDEAD)
        other = ControlBlock.attach(ctl.name)
        try:
            assert other.reader_slots == 5
            assert other.coordinator_pid == os.getpid()
            assert other.coordinator_start == start
            assert (other.next_segment, other.durable_lsn, other.oldest_segment) == (4, 123456789, 2)
            assert other.read_root() == (9, 0xDEAD)
            assert not other.shutting_down
            ctl.shutting_down = True
            assert other.shutting_down
            ctl.shutting_down = False
            assert not other.shutting_down
            assert other.readers() == []
        finally:
            other.close()
        raw = bytes(ctl._segment.buf[:HEADER_SIZE])
        assert raw[:8] == b"PBCTRL01"
        assert raw[8:16] == (1).to_bytes(4, "little") + (5).to_bytes(4, "little")
        assert raw[40:56] == (9).to_bytes(8, "little") + (0xDEAD).to_bytes(8, "little")
        assert raw[88:128] == bytes(40)
    finally:
        ctl.close()
        ctl.unlink()


def test_fresh_control_block_has_empty_root_and_free_slots(iid: str) -> None:
    ctl = _new_control(iid, slots=3)
    try:
        assert ctl.read_root() == (0, 0)
        assert [ctl.reader_snapshot(slot) for slot in range(3)] == [None, None, None]
        assert ctl.oldest_snapshot() is None
        assert repr(ctl) == f"<ControlBlock {ctl.name} reader_slots=3 open>"
    finally:
        ctl.close()
        ctl.unlink()
    assert repr(ctl) == f"<ControlBlock {ctl.name} reader_slots=3 closed>"


def test_attach_wrong_magic_is_corruption(iid: str) -> None:
    name = control_name(iid)
    segment = Segment.create(name, HEADER_SIZE + SLOT_SIZE)
    try:
        segment.buf[:8] = b"NOTMAGIC"
        with pytest.raises(CorruptionError, match="has magic b'NOTMAGIC', expected b'PBCTRL01'"):
            ControlBlock.attach(name)
    finally:
        segment.close()
        segment.unlink()


def test_attach_other_version_names_both(iid: str) -> None:
    ctl = _new_control(iid, slots=1)
    try:
        ctl._segment.buf[8:12] = (2).to_bytes(4, "little")
        with pytest.raises(ProtoBaseError, match="format version 2, this ProtoBase expects version 1"):
            ControlBlock.attach(ctl.name)
    finally:
        ctl.close()
        ctl.unlink()


def test_attach_truncated_table_is_corruption(iid: str) -> None:
    ctl = _new_control(iid, slots=2)
    try:
        ctl._segment.buf[12:16] = (1000).to_bytes(4, "little")
        with pytest.raises(CorruptionError, match="declares 1000 reader slots"):
            ControlBlock.attach(ctl.name)
    finally:
        ctl.close()
        ctl.unlink()


def test_attach_missing_control_is_coordinator_error(iid: str) -> None:
    with pytest.raises(CoordinatorError, match="is gone"):
        ControlBlock.attach(control_name(iid))


def test_closed_control_block_says_so(iid: str) -> None:
    ctl = _new_control(iid)
    ctl.close()
    ctl.close()
    try:
        with pytest.raises(DatabaseClosedError, match=f"control segment {ctl.name} is closed"):
            ctl.read_root()
        with pytest.raises(DatabaseClosedError):
            ctl.publish_root(1, 1)
        with pytest.raises(DatabaseClosedError):
            ctl.durable_lsn  # noqa: B018
    finally:
        ctl.unlink()


# -- control block: root seqlock --------------------------------------------


def _publish_until_stopped(name: str, started: Any, stop: Any, limit: int) -> None:
    ctl = ControlBlock.attach(name)
    try:
        seq = 1
        ctl.publish_root(seq, seq * 7)
        started.set()
        while seq < limit and not stop.is_set():
            for _ in range(100):  # check the event rarely: stay in the tight loop
                seq += 1
                ctl.publish_root(seq, seq * 7)
    finally:
        ctl.close()


@contextmanager
def publishing(ctl: ControlBlock, start_process: Callable[..., Any]) -> Iterator[None]:
    """A child publishing roots (seq, seq * 7) into `ctl` as fast as it can while the block runs."""
    started, stop = SPAWN.Event(), SPAWN.Event()
    writer = start_process(_publish_until_stopped, ctl.name, started, stop, 10**9)
    assert started.wait(30), "writer process did not start"
    try:
        yield
    finally:
        stop.set()
        writer.join(30)
    assert writer.exitcode == 0


def test_seqlock_reader_never_sees_a_torn_root(iid: str, start_process: Callable[..., Any]) -> None:
    ctl = _new_control(iid)
    try:
        seen = set()
        last = 0
        with publishing(ctl, start_process):
            # ~0.5 s of reads on an idle machine; on a loaded one the two
            # processes may take turns on a core, so read on (to a bound) until
            # the writer has moved the root many times.
            for reads in range(1, 3_000_001):
                seq, ptr = ctl.read_root()
                assert ptr == seq * 7, f"torn root: seq {seq} with pointer {ptr}"
                assert seq >= last, f"root went back from {last} to {seq}"
                last = seq
                seen.add(seq)
                if reads >= 300_000 and len(seen) >= 1000:
                    break
        # The reads overlapped the writer's publishing, not just followed it.
        assert len(seen) > 10, f"only {len(seen)} distinct roots seen in {reads} reads"
    finally:
        ctl.close()
        ctl.unlink()


def test_a_publish_never_shows_the_seqlock_counter_as_zero(iid: str, start_process: Callable[..., Any]) -> None:
    # Regression: publish_root wrote the counter with struct.pack_into, which zero-fills
    # before it writes: the counter read 0 (even, "stable") twice per publish, and a
    # reader whose two reads both met a zero took a half-written root for a whole one
    # (seen on Python 3.13 as a new seq with pointer 0).
    ctl = _new_control(iid)
    words = ctl._segment.buf.cast("Q")  # one 8-byte load per read: a bytewise read could itself tear
    try:
        counters = set()
        with publishing(ctl, start_process):
            # As above: on a loaded machine the writer may not run during the first reads,
            # so read on (to a bound) until it has published many times.
            for reads in range(1, 30_000_001):
                counters.add(words[4])  # the counter, at offset 32
                if reads >= 300_000 and len(counters) >= 1000:
                    break
        assert len(counters) > 10, f"the reads did not overlap the writer's publishing ({reads} reads)"
        assert 0 not in counters
    finally:
        words.release()
        ctl.close()
        ctl.unlink()


def test_half_written_root_times_out_as_dead_coordinator(iid: str) -> None:
    ctl = _new_control(iid)
    try:
        ctl._segment.buf[32:40] = (1).to_bytes(8, "little")  # odd: publish never finished
        ctl.stuck_timeout = 0.05
        with pytest.raises(CoordinatorError, match=r"died while publishing"):
            ctl.read_root()
    finally:
        ctl.close()
        ctl.unlink()


# -- control block: reader table --------------------------------------------


def test_reader_table_assign_release_and_full(iid: str) -> None:
    ctl = _new_control(iid, slots=3)
    try:
        slots = [ctl.assign_reader(1000 + i, 50.0 + i) for i in range(3)]
        assert slots == [0, 1, 2]
        with pytest.raises(ProtoBaseError, match=r"reader table full \(3 slots\)"):
            ctl.assign_reader(2000, 1.0)
        ctl.release_reader(1)
        assert ctl.assign_reader(2000, 1.0) == 1
        assert ctl.readers() == [
            ReaderSlot(0, 1000, 50.0, None),
            ReaderSlot(1, 2000, 1.0, None),
            ReaderSlot(2, 1002, 52.0, None),
        ]
        with pytest.raises(IndexError):
            ctl.release_reader(3)
    finally:
        ctl.close()
        ctl.unlink()


def test_reader_snapshots_and_oldest(iid: str) -> None:
    ctl = _new_control(iid, slots=4)
    try:
        a, b, c = (ctl.assign_reader(100 + i, 1.0) for i in range(3))
        ctl.set_reader_snapshot(a, 12)
        ctl.set_reader_snapshot(b, 7)
        assert (ctl.reader_snapshot(a), ctl.reader_snapshot(b), ctl.reader_snapshot(c)) == (12, 7, None)
        assert ctl.oldest_snapshot() == 7
        ctl.set_reader_snapshot(b, None)
        assert ctl.oldest_snapshot() == 12
        ctl.release_reader(a)
        assert ctl.oldest_snapshot() is None
        assert ctl.reader_snapshot(a) is None
        with pytest.raises(ValueError, match="snapshot seq"):
            ctl.set_reader_snapshot(c, NO_SNAPSHOT)
    finally:
        ctl.close()
        ctl.unlink()


def test_pin_snapshot_records_the_current_root(iid: str) -> None:
    ctl = _new_control(iid)
    try:
        ctl.publish_root(41, 0x1234)
        slot = ctl.assign_reader(os.getpid(), psutil.Process().create_time())
        assert ctl.pin_snapshot(slot) == (41, 0x1234)
        assert ctl.reader_snapshot(slot) == 41
        ctl.publish_root(42, 0x5678)
        assert ctl.oldest_snapshot() == 41  # still pinned until the worker moves on
    finally:
        ctl.close()
        ctl.unlink()


def _hold_snapshot_until_killed(name: str, slot: int, seq: int, ready: Any) -> None:
    ctl = ControlBlock.attach(name)
    ctl.set_reader_snapshot(slot, seq)
    ready.set()
    time.sleep(60)  # killed long before this ends


def test_reap_frees_the_slot_of_a_killed_reader(iid: str, start_process: Callable[..., Any]) -> None:
    ctl = _new_control(iid)
    try:
        me = ctl.assign_reader(os.getpid(), psutil.Process().create_time())
        ready = SPAWN.Event()
        child = start_process(_hold_snapshot_until_killed, ctl.name, 1, 5, ready)
        child_start = psutil.Process(child.pid).create_time()
        slot = ctl.assign_reader(child.pid, child_start)
        assert slot == 1
        assert ready.wait(30), "child did not pin its snapshot"
        assert ctl.oldest_snapshot() == 5
        assert ctl.reap_dead_readers() == []  # both alive

        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        assert child.exitcode == -signal.SIGKILL

        assert ctl.reap_dead_readers() == [ReaderSlot(1, child.pid, child_start, 5)]
        assert ctl.oldest_snapshot() is None
        assert [reader.slot for reader in ctl.readers()] == [me]
    finally:
        ctl.close()
        ctl.unlink()


def test_reap_treats_a_reused_pid_as_dead(iid: str) -> None:
    ctl = _new_control(iid)
    try:
        start = psutil.Process().create_time()
        ctl.assign_reader(os.getpid(), start - 1000.0)  # our pid, another process's start time
        ctl.assign_reader(os.getpid(), start)
        freed = ctl.reap_dead_readers()
        assert [reader.slot for reader in freed] == [0]
        assert [reader.slot for reader in ctl.readers()] == [1]
    finally:
        ctl.close()
        ctl.unlink()


def test_reap_uses_the_given_liveness_check(iid: str) -> None:
    ctl = _new_control(iid)
    try:
        for pid in (11, 12, 13):
            ctl.assign_reader(pid, 1.0)
        freed = ctl.reap_dead_readers(lambda pid, _start: pid != 12)
        assert [reader.pid for reader in freed] == [12]
        assert [reader.pid for reader in ctl.readers()] == [11, 13]
    finally:
        ctl.close()
        ctl.unlink()
