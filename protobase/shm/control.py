"""The control segment: the published root (under a seqlock), the reader table, and shared counters.

Owns: the byte format below and every read and write of it. One control
segment per database instance, named `names.control_name(iid)`.

Byte format, all integers and floats little-endian, every field 8-byte aligned::

    offset size field
    0      8    magic b"PBCTRL01"
    8      4    u32 format version (1)
    12     4    u32 reader slot count N
    16     8    u64 coordinator pid
    24     8    f64 coordinator process start time (psutil.Process().create_time())
    32     8    u64 seqlock counter (odd while the root is being written)
    40     8    u64 root seq
    48     8    u64 root pointer
    56     8    u64 next data segment index
    64     8    u64 durable LSN
    72     8    u64 oldest live data segment index (segments below are unlinked)
    80     8    u64 flags (bit 0: shutting down)
    88     8    u64 WAL failed: nonzero once the persistence process could not write or sync the WAL
    96     32   reserved (zero)
    128    N*32 reader table, one 32-byte slot per reader:
                  +0  u64 pid (0 = free slot)
                  +8  f64 process start time
                  +16 u64 snapshot seq (NO_SNAPSHOT = 2**64-1 when none held)
                  +24 u64 reserved (zero)

The segment is HEADER_SIZE + N * SLOT_SIZE bytes. A fresh block has root
seq 0 and root pointer 0 (nothing published yet) and every slot free.

Who writes what (single writer per field, so no field needs a lock):
- the coordinator writes the whole header (but for the durable LSN and
  the WAL-failed field, which the persistence process writes) and the pid
  and start time of every slot (`assign_reader`, `release_reader`, `reap_dead_readers`);
- a worker writes only the snapshot field of the slot it was assigned
  (`set_reader_snapshot`, `pin_snapshot`). Workers map the segment writable
  for that one field; data segments they map read-only.

The root seqlock: `publish_root` makes the counter odd, writes seq and
pointer, then makes it even again; `read_root` retries until it reads an even
counter that did not change across its read of the two fields, so a reader
never sees the seq of one root with the pointer of another. Every u64 field
another process reads is written with one aligned 8-byte store, through a
memoryview of the segment cast to 8-byte words (never struct.pack_into,
which zero-fills its target before writing it: a counter passing through 0
looks even), and x86-64 keeps stores, and loads, in program order.

The reader protocol (LMDB's): to take a snapshot, a worker reads the root,
writes that root's seq into its slot, then reads the root again; if the root
changed meanwhile it starts over (`pin_snapshot`). The coordinator frees
only memory retired at seqs <= `oldest_snapshot()`, so it never frees what a
reader is about to use: either the coordinator saw the reader's seq, or the
reader saw the newer root and retries. Both sides put a full memory fence
between their store and their following load (see `full_fence`); without
it the CPU's store buffer could let each miss the other's store.
Dead readers (kill -9) are found by pid and process start time, since pids
are reused, and their slots freed (`reap_dead_readers`), so they cannot pin
memory forever.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from protobase.errors import (
    CoordinatorError,
    CorruptionError,
    DatabaseClosedError,
    ProtoBaseError,
)
from protobase.settings import DEFAULTS
from protobase.shm.segment import Segment

__all__ = [
    "DEFAULT_READER_SLOTS",
    "HEADER_SIZE",
    "MAGIC",
    "NO_SNAPSHOT",
    "SLOT_SIZE",
    "VERSION",
    "ControlBlock",
    "ReaderSlot",
    "process_is_alive",
    "process_start_time",
]

MAGIC = b"PBCTRL01"
VERSION = 1
HEADER_SIZE = 128
SLOT_SIZE = 32
DEFAULT_READER_SLOTS = DEFAULTS.reader_slots  # 1024 (protobase/settings.py)
#: Snapshot field value of a slot that holds no snapshot.
NO_SNAPSHOT = 2**64 - 1

# Header field offsets (see the table above).
_OFF_MAGIC = 0
_OFF_PID = 16
_OFF_START = 24
_OFF_COUNTER = 32
_OFF_ROOT_SEQ = 40
_OFF_NEXT_SEGMENT = 56
_OFF_DURABLE_LSN = 64
_OFF_OLDEST_SEGMENT = 72
_OFF_FLAGS = 80
_OFF_WAL_FAILED = 88
# Slot field offsets, relative to the slot.
_SLOT_PID = 0
_SLOT_SNAPSHOT = 16

_FLAG_SHUTTING_DOWN = 1

# Precompiled: read_root sits on every snapshot. On a little-endian host,
# struct uses the native routines (one 8-byte memcpy per field) for "<Q".
_IDENT = struct.Struct("<8sII")  # magic, version, reader slot count
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
# Word indexes (offset // 8) of the seqlock's fields, for the 8-byte word view.
_W_COUNTER, _W_ROOT_SEQ, _W_ROOT_PTR = _OFF_COUNTER // 8, _OFF_ROOT_SEQ // 8, _OFF_ROOT_SEQ // 8 + 1
_SLOT = struct.Struct("<QdQQ")  # pid, start time, snapshot seq, reserved

# The seqlock leans on x86-64's ordering (and struct's single 8-byte copies).
assert sys.byteorder == "little", "the control segment format assumes a little-endian host"

_MAX_TIME_MISMATCH = 0.01  # seconds; create_time is jiffy-precise (10 ms)
_fence_lock = threading.Lock()


def full_fence() -> None:
    # Python has no fence primitive. Acquiring a lock is an atomic
    # read-modify-write (a lock-prefixed instruction on x86-64), which the CPU
    # treats as a full barrier: earlier stores become visible before later
    # loads run. Costs ~100 ns, paid once per snapshot and per reclaim scan.
    _fence_lock.acquire()
    _fence_lock.release()


@dataclass(frozen=True)
class ReaderSlot:
    """One occupied slot of the reader table, as read at one moment."""

    slot: int  # index in the table
    pid: int  # the reader's process id
    start_time: float  # the reader's process start time (psutil create_time)
    snapshot_seq: int | None  # the seq it holds, or None


def process_start_time(pid: int | None = None) -> float:
    """Return the start time of process *pid* (this process if None), as the reader table stores it.

    Raises psutil.NoSuchProcess if there is no such process.
    """
    return psutil.Process(pid).create_time()


def process_is_alive(pid: int, start_time: float) -> bool:
    """Return True if a live process has this *pid* and was started at *start_time*.

    Pids are reused, so the pid alone does not identify a process: a process
    with the same pid but another start time is a different one, and the
    reader it stood for is dead. A zombie is dead. When we are not allowed to
    look, or cannot (out of file descriptors to read /proc with), we say
    alive: wrongly freeing a live reader's slot would free memory under it,
    wrongly keeping a dead one only delays reclaim.
    Note the start time is wall-clock based; a clock step of a second or more
    between record and check would misjudge (psutil derives it from boot time).
    """
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - start_time) >= _MAX_TIME_MISMATCH:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except (psutil.AccessDenied, OSError):
        return True


class ControlBlock:
    """The control segment of one database instance. Make one with `create` or `attach`."""

    #: Seconds `read_root` waits on a root that stays half-written before
    #: concluding that the coordinator died in the middle of publishing it.
    stuck_timeout: float = 2.0

    def __init__(self, segment: Segment, reader_slots: int) -> None:
        """Wrap a validated segment. Internal: use `ControlBlock.create` or `ControlBlock.attach`."""
        self._segment = segment  # the mapped control segment, writable
        self._buf: memoryview | None = segment.buf  # segment.buf, cached for speed; None once closed
        # The same bytes as 8-byte words: assigning one is a single aligned 8-byte store,
        # whereas struct.pack_into first zero-fills what it writes (see `publish_root`).
        # Released once closed, so that any use raises ValueError (read_root relies on it).
        self._words: memoryview = segment.buf.cast("Q")
        self._slots = reader_slots  # N, the reader slot count

    # -- creation and attachment ------------------------------------------

    @classmethod
    def create(
        cls,
        name: str,
        *,
        reader_slots: int = DEFAULT_READER_SLOTS,
        coordinator_pid: int,
        coordinator_start: float,
    ) -> ControlBlock:
        """Create and initialise the control segment *name*. Coordinator only.

        Every slot starts free, the root at seq 0, pointer 0. Raises
        ValueError for a slot count outside 1..2**32-1, and what
        `Segment.create` raises (name exists, /dev/shm full).
        """
        if not 1 <= reader_slots < 2**32:
            raise ValueError(f"reader_slots must be in 1..2**32-1, got {reader_slots}")
        segment = Segment.create(name, HEADER_SIZE + reader_slots * SLOT_SIZE)
        buf = segment.buf
        _U64.pack_into(buf, _OFF_PID, coordinator_pid)
        _F64.pack_into(buf, _OFF_START, coordinator_start)
        for slot in range(reader_slots):
            _SLOT.pack_into(buf, HEADER_SIZE + slot * SLOT_SIZE, 0, 0.0, NO_SNAPSHOT, 0)
        # Identity last: a block with a valid magic is a complete block. The
        # other fields are already zero (fallocate zero-fills).
        _IDENT.pack_into(buf, _OFF_MAGIC, MAGIC, VERSION, reader_slots)
        return cls(segment, reader_slots)

    @classmethod
    def attach(cls, name: str) -> ControlBlock:
        """Map the existing control segment *name*, writable (for this worker's own slot).

        Raises CoordinatorError if it is gone, CorruptionError if it is not a
        control segment (too short, wrong magic, table does not fit),
        ProtoBaseError if it has another format version.
        """
        segment = Segment.attach(name, writable=True)
        try:
            slots = _validate(segment)
        except BaseException:
            segment.close()
            raise
        return cls(segment, slots)

    # -- the root (seqlock) -----------------------------------------------

    def publish_root(self, seq: int, root_ptr: int) -> None:
        """Publish a new root: readers see (seq, root_ptr) together or not at all.

        Coordinator only: the seqlock allows a single writer.
        """
        # One store per field, through the word view: struct.pack_into zero-fills its
        # target before writing it, so the counter would read 0 (even) twice per publish,
        # and a reader spanning both zeros took a half-written root for a whole one
        # (seen on Python 3.13: a new seq with pointer 0).
        words = self._live_words()
        counter = words[_W_COUNTER]
        assert counter % 2 == 0, f"seqlock counter {counter} is odd: a publish was interrupted"
        words[_W_COUNTER] = counter + 1  # odd: readers will retry
        words[_W_ROOT_SEQ] = seq
        words[_W_ROOT_PTR] = root_ptr
        words[_W_COUNTER] = counter + 2  # even: the root is whole

    def read_root(self) -> tuple[int, int]:
        """Return the published root as (seq, root pointer), never torn. Any process, lock-free.

        Raises DatabaseClosedError once closed, CoordinatorError if the root
        stays half-written for `stuck_timeout` seconds (the coordinator died
        while publishing).
        """
        words = self._words
        try:
            counter = words[_W_COUNTER]
            seq, ptr = words[_W_ROOT_SEQ], words[_W_ROOT_PTR]
            if not counter & 1 and words[_W_COUNTER] == counter:
                return seq, ptr
        except ValueError:  # no check before the try: a closed block's released word view raises
            if self._buf is None:
                raise DatabaseClosedError(f"control segment {self.name} is closed") from None
            raise
        return self._read_root_contended()

    def _read_root_contended(self) -> tuple[int, int]:
        # Slow path, taken when we raced a publish. Spin a little, then yield
        # the CPU: the writer may be descheduled halfway through.
        words = self._live_words()
        deadline = None
        spins = 0
        while True:
            counter = words[_W_COUNTER]
            seq, ptr = words[_W_ROOT_SEQ], words[_W_ROOT_PTR]
            if not counter & 1 and words[_W_COUNTER] == counter:
                return seq, ptr
            spins += 1
            if spins % 64:
                continue
            os.sched_yield()
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.stuck_timeout
            elif now > deadline:
                raise CoordinatorError(
                    f"the root in {self.name} has been half-written for {self.stuck_timeout}s: "
                    f"the coordinator (pid {self.coordinator_pid}) died while publishing; "
                    f"reopen the database"
                )

    def pin_snapshot(self, slot: int) -> tuple[int, int]:
        """Take a snapshot for the worker owning *slot*: record its seq there, return (seq, root pointer).

        The reader protocol of the module docstring: after this returns, the
        coordinator will not free anything the returned root can reach until
        the worker writes another seq (or None) into its slot.
        """
        while True:
            seq, ptr = self.read_root()
            self.set_reader_snapshot(slot, seq)
            full_fence()  # our seq must be visible before we re-read the root
            if self.read_root()[0] == seq:
                return seq, ptr

    # -- the reader table -------------------------------------------------

    def assign_reader(self, pid: int, start_time: float) -> int:
        """Give the reader process (*pid*, *start_time*) a free slot; return its index. Coordinator only.

        The slot starts with no snapshot. Raises ProtoBaseError when every
        slot is taken.
        """
        buf = self._live_buf()
        for slot, (slot_pid, *_rest) in enumerate(self._iter_slots(buf)):
            if slot_pid == 0:
                offset = _slot_offset(slot)
                _SLOT.pack_into(buf, offset, 0, start_time, NO_SNAPSHOT, 0)
                _U64.pack_into(buf, offset + _SLOT_PID, pid)  # pid last: it marks the slot taken
                return slot
        raise ProtoBaseError(
            f"reader table full ({self._slots} slots): every slot is held by an open database "
            f"handle (one per protobase.open() in each process; slots of dead processes are "
            f"freed within a second); close idle handles, or start the coordinator with more "
            f"slots: protobase serve DIR --reader-slots N, or protobase.open(DIR, reader_slots=N)"
        )

    def release_reader(self, slot: int) -> None:
        """Free *slot*: no pid, no snapshot. Coordinator only."""
        buf = self._live_buf()
        offset = self._checked_offset(slot)
        _U64.pack_into(buf, offset + _SLOT_SNAPSHOT, NO_SNAPSHOT)  # unpin before freeing
        _SLOT.pack_into(buf, offset, 0, 0.0, NO_SNAPSHOT, 0)

    def set_reader_snapshot(self, slot: int, seq: int | None) -> None:
        """Record the snapshot seq held by *slot*'s reader, or None when it holds none.

        Only the worker owning *slot* calls this. To take a new snapshot use
        `pin_snapshot`, which follows the reader protocol; writing a seq
        read earlier does not protect it.
        """
        if seq is None:
            seq = NO_SNAPSHOT
        elif not 0 <= seq < NO_SNAPSHOT:
            raise ValueError(f"snapshot seq must be in 0..2**64-2, got {seq}")
        self._set_u64(self._checked_offset(slot) + _SLOT_SNAPSHOT, seq)

    def reader_snapshot(self, slot: int) -> int | None:
        """Return the snapshot seq held by *slot*, or None."""
        offset = self._checked_offset(slot)
        seq = _U64.unpack_from(self._live_buf(), offset + _SLOT_SNAPSHOT)[0]
        return None if seq == NO_SNAPSHOT else seq

    def readers(self) -> list[ReaderSlot]:
        """Return the occupied slots, in slot order."""
        return [
            ReaderSlot(slot, pid, start, None if seq == NO_SNAPSHOT else seq)
            for slot, (pid, start, seq, _reserved) in enumerate(self._iter_slots(self._live_buf()))
            if pid != 0
        ]

    def oldest_snapshot(self) -> int | None:
        """Return the oldest snapshot seq any reader holds, or None if none holds one.

        Coordinator: memory retired at seqs <= this value may be freed; with
        None, everything retired before the current root may be. Call it
        after publishing the root that retired the memory.
        """
        full_fence()  # our publish must be visible before we read the slots
        held = [seq for _slot, pid, seq in self._snapshots() if pid != 0 and seq != NO_SNAPSHOT]
        return min(held, default=None)

    def reap_dead_readers(self, is_alive: Callable[[int, float], bool] | None = None) -> list[ReaderSlot]:
        """Free the slots of readers that are no longer running; return them as they were. Coordinator only.

        *is_alive(pid, start_time)* decides; the default, `process_is_alive`,
        asks the OS and matches the start time, since pids are reused.
        """
        check = process_is_alive if is_alive is None else is_alive
        freed = []
        for reader in self.readers():
            if not check(reader.pid, reader.start_time):
                self.release_reader(reader.slot)
                freed.append(reader)
        return freed

    # -- header fields ----------------------------------------------------

    @property
    def name(self) -> str:
        """The segment name."""
        return self._segment.name

    @property
    def reader_slots(self) -> int:
        """N, the number of reader slots."""
        return self._slots

    @property
    def coordinator_pid(self) -> int:
        """Pid of the coordinator that created this block."""
        pid: int = _U64.unpack_from(self._live_buf(), _OFF_PID)[0]
        return pid

    @property
    def coordinator_start(self) -> float:
        """Process start time of the coordinator that created this block."""
        start: float = _F64.unpack_from(self._live_buf(), _OFF_START)[0]
        return start

    @property
    def next_segment(self) -> int:
        """Index the next data segment will get. Set by the coordinator only."""
        return self._get_u64(_OFF_NEXT_SEGMENT)

    @next_segment.setter
    def next_segment(self, value: int) -> None:
        self._set_u64(_OFF_NEXT_SEGMENT, value)

    @property
    def durable_lsn(self) -> int:
        """LSN up to which the WAL is fsynced. Set by the persistence process only, after each fsync."""
        return self._get_u64(_OFF_DURABLE_LSN)

    @durable_lsn.setter
    def durable_lsn(self, value: int) -> None:
        self._set_u64(_OFF_DURABLE_LSN, value)

    @property
    def wal_failed(self) -> bool:
        """True once writing or syncing the WAL failed. Set by the persistence process only, never cleared.

        The coordinator reads it before it hands over each commit, so that it
        stops acknowledging the moment the disk fails, not when it gets to
        the persistence process's report.
        """
        return bool(self._get_u64(_OFF_WAL_FAILED))

    @wal_failed.setter
    def wal_failed(self, value: bool) -> None:
        self._set_u64(_OFF_WAL_FAILED, int(value))

    @property
    def oldest_segment(self) -> int:
        """Index of the oldest live data segment; those below are unlinked. Set by the coordinator only."""
        return self._get_u64(_OFF_OLDEST_SEGMENT)

    @oldest_segment.setter
    def oldest_segment(self, value: int) -> None:
        self._set_u64(_OFF_OLDEST_SEGMENT, value)

    @property
    def shutting_down(self) -> bool:
        """True once the coordinator has begun shutting down. Set by the coordinator only."""
        return bool(self._get_u64(_OFF_FLAGS) & _FLAG_SHUTTING_DOWN)

    @shutting_down.setter
    def shutting_down(self, value: bool) -> None:
        flags = self._get_u64(_OFF_FLAGS)
        flags = flags | _FLAG_SHUTTING_DOWN if value else flags & ~_FLAG_SHUTTING_DOWN
        self._set_u64(_OFF_FLAGS, flags)

    # -- lifetime ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once `close` has been called."""
        return self._buf is None

    def close(self) -> None:
        """Unmap the control segment from this process. Idempotent; never unlinks."""
        if self._buf is not None:
            self._buf = None
            self._words.release()
        self._segment.close()

    def unlink(self) -> bool:
        """Remove the control segment's name. Coordinator only; False if already gone."""
        return self._segment.unlink()

    def __enter__(self) -> ControlBlock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<ControlBlock {self.name} reader_slots={self._slots} {state}>"

    # -- internals --------------------------------------------------------

    def _live_buf(self) -> memoryview:
        if self._buf is None:
            raise DatabaseClosedError(f"control segment {self.name} is closed")
        return self._buf

    def _live_words(self) -> memoryview:
        if self._buf is None:
            raise DatabaseClosedError(f"control segment {self.name} is closed")
        return self._words

    def _get_u64(self, offset: int) -> int:
        return self._live_words()[offset // 8]

    def _set_u64(self, offset: int, value: int) -> None:
        self._live_words()[offset // 8] = value  # one store: never a transient 0 (see publish_root)

    def _checked_offset(self, slot: int) -> int:
        if not 0 <= slot < self._slots:
            raise IndexError(f"reader slot {slot} out of range 0..{self._slots - 1}")
        return _slot_offset(slot)

    def _iter_slots(self, buf: memoryview) -> list[tuple[int, float, int, int]]:
        # One C-level pass over the table; materialised so that no buffer
        # export outlives the call (it would keep close() from unmapping).
        table = buf[HEADER_SIZE : HEADER_SIZE + self._slots * SLOT_SIZE]
        try:
            return list(_SLOT.iter_unpack(table))
        finally:
            table.release()

    def _snapshots(self) -> list[tuple[int, int, int]]:
        return [
            (slot, pid, seq) for slot, (pid, _start, seq, _reserved) in enumerate(self._iter_slots(self._live_buf()))
        ]


def _slot_offset(slot: int) -> int:
    return HEADER_SIZE + slot * SLOT_SIZE


def _validate(segment: Segment) -> int:
    # Returns the reader slot count of a segment that passed every check.
    if segment.size < HEADER_SIZE:
        raise CorruptionError(
            f"control segment {segment.name} is {segment.size} bytes, shorter than its {HEADER_SIZE}-byte header"
        )
    magic: bytes
    version: int
    slots: int
    magic, version, slots = _IDENT.unpack_from(segment.buf, _OFF_MAGIC)
    if magic != MAGIC:
        raise CorruptionError(
            f"control segment {segment.name} has magic {magic!r}, expected {MAGIC!r}: "
            f"it is not a ProtoBase control segment"
        )
    if version != VERSION:
        raise ProtoBaseError(
            f"control segment {segment.name} has format version {version}, this ProtoBase "
            f"expects version {VERSION}: open the database with the ProtoBase version its "
            f"coordinator runs"
        )
    needed = HEADER_SIZE + slots * SLOT_SIZE
    if slots == 0 or segment.size < needed:
        raise CorruptionError(
            f"control segment {segment.name} declares {slots} reader slots ({needed} bytes) but is {segment.size} bytes"
        )
    return slots
