"""The commit ring: a single-producer single-consumer byte ring in shared memory.

Owns the ring segment's format. The coordinator (the only producer) appends
one record per commit; the persistence process (the only consumer) drains
them into the write-ahead log. `head` is written only by the producer, `tail`
only by the consumer, each on its own cache line, so no lock is ever taken.
A full ring applies back-pressure: the producer waits for the consumer, it
never drops a record.

Byte format (little-endian):

    offset size field
    0      8    magic b"PBRING01"
    8      4    u32 format version (1)
    12     4    reserved
    16     8    u64 capacity of the data area in bytes (a multiple of 8)
    24     40   reserved
    64     8    u64 head: bytes ever produced (producer only)
    72     56   reserved
    128    8    u64 tail: bytes ever consumed (consumer only)
    136    56   reserved
    192    capacity  data area

A record starts at `position % capacity`, 8-byte aligned, and never wraps:

    0  4  u32 payload length (WRAP = 0xFFFFFFFF: skip to the start of the data area)
    4  1  u8  flags (SYNC: the committer waits for it to be durable; MORE: a fragment,
              the payload continues in the next record; CONT: this fragment continues
              the previous one; CONTROL: not a commit)
    5  3  reserved
    8  8  u64 LSN of the commit (0 for a CONTROL record)
    16 n  payload

Ordering: the producer writes a record, then advances head; the consumer reads
head, then the record, and advances tail only after it has written the record
to the WAL file (so a consumer killed mid-way finds it again). Fragments of a
record larger than the ring are the exception: they are released as they are
copied out, since such a record could never fit whole. On x86-64 the store
order this relies on holds for plain stores.

"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Sequence

from protobase.errors import CorruptionError
from protobase.shm.segment import Segment

__all__ = ["CommitRing", "SYNC", "MORE", "CONTROL", "RingRecord"]

MAGIC = b"PBRING01"
VERSION = 1
DATA_OFFSET = 192
HEAD_OFFSET = 64
TAIL_OFFSET = 128
SYNC, MORE, CONTROL, CONT = 1, 2, 4, 8
WRAP = 0xFFFFFFFF
_W_HEAD, _W_TAIL = HEAD_OFFSET // 8, TAIL_OFFSET // 8  # indexes in the 8-byte word view
DEFAULT_CAPACITY = 4 << 20  # large commits are fragmented, so this only bounds the backlog

_IDENT = struct.Struct("<8sI4xQ")
_RECORD = struct.Struct("<IB3xQ")


class RingRecord(tuple[int, int, bytes | list[bytes]]):
    """(lsn, flags, payload) of one whole record: its bytes, or for one that came in fragments, their list.

    The fragments of a large record are never joined: the WAL writer takes
    them as they are (a bulk commit's 57 MB were copied twice more).
    """

    __slots__ = ()

    @property
    def lsn(self) -> int:
        return self[0]

    @property
    def flags(self) -> int:
        return self[1]

    @property
    def payload(self) -> bytes | list[bytes]:
        return self[2]


class CommitRing:
    """One end (producer or consumer) of the commit ring."""

    def __init__(self, segment: Segment, capacity: int) -> None:
        self.segment = segment
        self.buf = segment.buf
        # head and tail as 8-byte words: one store each. struct.pack_into zero-fills
        # before it writes, and a tail read as 0 made the producer wait for room.
        self.words = segment.buf.cast("Q")
        self.capacity = capacity  # bytes in the data area
        self.max_fragment = capacity // 4 - _RECORD.size  # larger payloads are split
        self.partial: list[bytes] = []  # consumer: fragments of a record not yet whole

    @classmethod
    def create(cls, name: str, capacity: int = DEFAULT_CAPACITY) -> CommitRing:
        """Create the ring segment (coordinator)."""
        capacity = max(4096, capacity) & ~7
        segment = Segment.create(name, DATA_OFFSET + capacity)
        _IDENT.pack_into(segment.buf, 0, MAGIC, VERSION, capacity)
        return cls(segment, capacity)

    @classmethod
    def attach(cls, name: str) -> CommitRing:
        """Map an existing ring (persistence process); it writes `tail`, so writable."""
        segment = Segment.attach(name, writable=True)
        magic, version, capacity = _IDENT.unpack_from(segment.buf, 0)
        if magic != MAGIC or version != VERSION or DATA_OFFSET + capacity > segment.size:
            segment.close()
            raise CorruptionError(f"shared memory segment {name} is not a version-{VERSION} commit ring")
        return cls(segment, capacity)

    @property
    def head(self) -> int:
        return self.words[_W_HEAD]

    @property
    def tail(self) -> int:
        return self.words[_W_TAIL]

    # -- producer ----------------------------------------------------------------

    def append(
        self, lsn: int, flags: int, payload: bytes | Sequence[bytes], wait: Callable[[], None] | None = None
    ) -> int:
        """Append one record (split in fragments if large); block while the ring is full. Returns its length.

        A payload given as parts is their concatenation, which is never made:
        a bulk commit's WAL record is a short header and the 50 MB the client sent.
        `wait()` is called between checks of a full ring (default: a short sleep);
        it may raise to give up, e.g. when the consumer died.
        """
        pieces = [payload] if isinstance(payload, bytes) else payload
        left = sum(len(piece) for piece in pieces)
        if left <= self.max_fragment:  # the common case (a commit: its header and its ops): one fragment
            self._append_one(lsn, flags, pieces, wait, left)
            return left
        parts = [memoryview(piece) for piece in pieces]
        total, continuation = left, 0
        while True:
            fragment: list[memoryview] = []  # the next max_fragment bytes of the parts
            room = size = min(left, self.max_fragment)
            left -= room
            while room:
                piece, parts[0] = parts[0][:room], parts[0][room:]
                fragment.append(piece)
                room -= len(piece)
                if not parts[0]:
                    parts.pop(0)
            more = MORE if left else 0
            self._append_one(lsn, flags | more | continuation, fragment, wait, size)
            if not more:
                return total
            continuation = CONT

    def _append_one(
        self, lsn: int, flags: int, pieces: Sequence[bytes | memoryview], wait: Callable[[], None] | None, length: int
    ) -> None:
        size = (_RECORD.size + length + 7) & ~7
        head = self.head
        offset = head % self.capacity
        room_to_end = self.capacity - offset
        padding = room_to_end if room_to_end < size else 0
        while head + padding + size - self.tail > self.capacity:
            (wait or _short_sleep)()
        buf = self.buf
        if padding:
            if room_to_end >= 4:
                struct.pack_into("<I", buf, DATA_OFFSET + offset, WRAP)
            head += padding
            offset = 0
        start = DATA_OFFSET + offset
        _RECORD.pack_into(buf, start, length, flags, lsn)
        at = start + _RECORD.size
        for piece in pieces:
            buf[at : at + len(piece)] = piece
            at += len(piece)
        self.words[_W_HEAD] = head + size  # publish: the record is whole

    # -- consumer ----------------------------------------------------------------

    def read(self, limit: int = 1 << 30) -> tuple[list[RingRecord], int]:
        """Whole records available now (about `limit` payload bytes at most) and the tail after them.

        Call `release(tail)` once they are safely written. Fragments of a record
        larger than the ring are copied into this consumer's memory and their
        room released at once, or a record bigger than the ring could never
        complete; its payload is the list of them. A consumer that starts in
        the middle of such a record (its predecessor died holding the first
        fragments) cannot rebuild it and raises CorruptionError: the database
        must stop and recover.
        """
        records: list[RingRecord] = []
        position, head = self.tail, self.head
        consumed = position
        total = 0
        while position < head and total < limit:
            offset = position % self.capacity
            if self.capacity - offset < 4 or struct.unpack_from("<I", self.buf, DATA_OFFSET + offset)[0] == WRAP:
                position += self.capacity - offset
                continue
            length, flags, lsn = _RECORD.unpack_from(self.buf, DATA_OFFSET + offset)
            start = DATA_OFFSET + offset + _RECORD.size
            if start + length > DATA_OFFSET + self.capacity:
                raise CorruptionError(f"commit ring record at {position} overruns the ring")
            if bool(flags & CONT) != bool(self.partial):
                raise CorruptionError(
                    f"commit ring: a fragment of commit {lsn} arrived without its beginning (the previous "
                    f"persistence process died inside a large commit); the database must restart to recover"
                )
            self.partial.append(bytes(self.buf[start : start + length]))
            position += (_RECORD.size + length + 7) & ~7
            total += length
            consumed = position
            if not flags & MORE:
                whole = self.partial if len(self.partial) > 1 else self.partial[0]
                records.append(RingRecord((lsn, flags & ~CONT, whole)))
                self.partial = []
        return records, consumed

    def release(self, tail: int) -> None:
        """Free the ring up to `tail` (consumer)."""
        self.words[_W_TAIL] = tail

    def close(self) -> None:
        self.words.release()
        self.segment.close()

    def unlink(self) -> None:
        self.segment.unlink()


def _short_sleep() -> None:
    time.sleep(0.0005)
