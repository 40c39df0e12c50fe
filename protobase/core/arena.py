"""Atoms: immutable records in append-only shared-memory segments.

Owns the atom format and the AtomPointer. Only the coordinator appends
(`ArenaWriter`, through the `Tail` of the segment it appends to, compiled in
carena.c); every process reads (`AtomReader`), mapping data segments
read-only, lazily, the first time a pointer names one.

AtomPointer: a 64-bit int, `segment_index << 40 | offset`. Segment indexes
start at 1 and are never reused, and a segment is only ever appended to, so a
pointer names one atom forever: every per-process cache keyed by pointer stays
valid for as long as the atom exists. Pointer 0 is the null pointer.

Atom layout (little-endian), 4-byte aligned inside its segment:

    offset size field
    0      4    u32: kind (VALUE, DICT_LEAF, ... below) in the top 4 bits, payload length in the low 28
    4      n    payload: msgpack (see codec.py for values, btree/node.py for nodes, index.py for INDEXED)

so an atom holds at most 256 MiB (larger containers are trees of atoms).

Segments grow: the first is 1 MiB, each next one a quarter of the current
generation (up to `MAX_SEGMENT`, or larger when one atom needs it), so reserved
memory exceeds the data by at most about 25%. There is no size to set up front.
A generation is what one compaction copied plus what was appended since;
older generations wait for unlinking (server.py) and do not count.

"""

from __future__ import annotations

import struct
from collections.abc import Callable

from protobase import native
from protobase.errors import CorruptionError, EncodingError, ProtoBaseError
from protobase.shm import names
from protobase.shm.segment import Segment

__all__ = [
    "VALUE",
    "DICT_LEAF",
    "DICT_BRANCH",
    "SET_LEAF",
    "SET_BRANCH",
    "LIST_LEAF",
    "LIST_BRANCH",
    "INDEXED",
    "KIND_NAMES",
    "make_pointer",
    "segment_of",
    "offset_of",
    "Tail",
    "ArenaWriter",
    "AtomReader",
    "write_atoms",
]

VALUE, DICT_LEAF, DICT_BRANCH, SET_LEAF, SET_BRANCH, LIST_LEAF, LIST_BRANCH, INDEXED = range(1, 9)
KIND_NAMES = {
    VALUE: "value",
    DICT_LEAF: "dict leaf",
    DICT_BRANCH: "dict branch",
    SET_LEAF: "set leaf",
    SET_BRANCH: "set branch",
    LIST_LEAF: "list leaf",
    LIST_BRANCH: "list branch",
    INDEXED: "indexed collection",
}

HEADER = struct.Struct("<I")
LENGTH_BITS = 28
MAX_PAYLOAD = (1 << LENGTH_BITS) - 1
ALIGN = 4
OFFSET_BITS = 40
OFFSET_MASK = (1 << OFFSET_BITS) - 1
MAX_SEGMENTS = 1 << 20  # segment index bits left once a Ref folds the kind into a pointer (codec.py)
FIRST_SEGMENT = 1 << 20
MAX_SEGMENT = 256 << 20


_PADDING = [bytes(n) for n in range(ALIGN)]  # the zeros that align an atom's end, by count
WrittenAtoms = tuple[list[int], int]  # (their pointers, the offset after the last)


def atom_size(payload_length: int) -> int:
    """Bytes an atom with this payload takes in its segment, header and alignment included."""
    return (HEADER.size + payload_length + ALIGN - 1) & ~(ALIGN - 1)


def make_pointer(segment: int, offset: int) -> int:
    """The AtomPointer of the atom at `offset` in data segment `segment`."""
    return segment << OFFSET_BITS | offset


def segment_of(ptr: int) -> int:
    return ptr >> OFFSET_BITS


def offset_of(ptr: int) -> int:
    return ptr & OFFSET_MASK


def write_atoms(buf: memoryview, offset: int, kind: int, payloads: list[bytes], base: int) -> WrittenAtoms | None:
    """Write `payloads` as atoms of `kind` into `buf` from `offset`, back to back: (pointers, end offset).

    The pointer of the atom at offset o is `base + o`. None, with nothing
    written, when they do not all fit before the end of `buf` or one exceeds
    MAX_PAYLOAD. The padding is zeros, as in a fresh segment. (carena.c has
    the compiled twin, which writes the same bytes.)
    """
    parts: list[bytes] = []
    pointers: list[int] = []
    end = offset
    header, pack_header = kind << LENGTH_BITS, HEADER.pack
    for payload in payloads:
        length = len(payload)
        if length > MAX_PAYLOAD:
            return None
        parts.append(pack_header(header | length))
        parts.append(payload)
        padding = -length & (ALIGN - 1)  # HEADER.size is a multiple of ALIGN
        if padding:
            parts.append(_PADDING[padding])
        pointers.append(base + end)
        end += HEADER.size + length + padding
    if end > len(buf):
        return None
    buf[offset:end] = b"".join(parts)
    return pointers, end


class Tail:
    """Where the next atom goes: the end of the segment being appended to (coordinator only).

    `append(kind, payload)` writes the atom there and returns its pointer, or
    hands it to `overflow(kind, payload)` when it does not fit (or nothing is
    attached, or it is too large), which opens a new segment and attaches it.
    Its compiled twin (carena.c) writes the same bytes without a Python frame:
    a splice writes a dozen nodes through it per commit.
    """

    def __init__(self, overflow: Callable[[int, bytes], int]) -> None:
        self.overflow = overflow
        self.buf: memoryview | None = None  # the segment attached
        self.base = 0  # the pointer of its offset 0
        self.used = 0  # bytes of it written
        self.allocated = 0  # bytes appended, headers and padding included

    def attach(self, buf: memoryview, base: int, used: int) -> None:
        """Append into `buf` from offset `used`; the atom at offset o gets pointer `base + o`."""
        if not 0 <= used <= len(buf):
            raise ValueError(f"attach: {used} bytes used of a {len(buf)}-byte segment")
        self.buf, self.base, self.used = buf, base, used

    def detach(self) -> None:
        """Append nowhere: every atom overflows (and the segment can be unmapped)."""
        self.buf = None

    def append(self, kind: int, payload: bytes) -> int:
        """Write one atom; return its AtomPointer."""
        if not isinstance(payload, bytes):
            raise TypeError(f"an atom's payload must be bytes, not {type(payload).__name__}")
        length, buf = len(payload), self.buf
        size = atom_size(length)
        if buf is None or length > MAX_PAYLOAD or len(buf) - self.used < size:
            return self.overflow(kind, payload)
        offset = self.used
        HEADER.pack_into(buf, offset, kind << LENGTH_BITS | length)
        buf[offset + HEADER.size : offset + HEADER.size + length] = payload
        self.used += size
        self.allocated += size
        return self.base + offset


_compiled = native.load("protobase.core.carena")
_write_atoms: Callable[[memoryview, int, int, list[bytes], int], WrittenAtoms | None] = (
    write_atoms if _compiled is None else _compiled.write_atoms
)
_Tail: type[Tail] = Tail if _compiled is None else _compiled.Tail


class ArenaWriter:
    """Appends atoms to the data segments of one instance (coordinator only)."""

    def __init__(self, instance_id: str, on_new_segment: Callable[[int], None] = lambda index: None) -> None:
        self.instance_id = instance_id
        self.segments: dict[int, Segment] = {}  # {segment index -> segment, live ones}
        self.on_new_segment = on_new_segment  # publishes the next segment index
        self.next_index = 1  # index of the next segment to create; never reused
        self.current: Segment | None = None  # the segment being appended to
        self.current_index = 0
        self.used_of: dict[int, int] = {}  # {segment index -> bytes used}, for finished segments
        self.generation_start = 1  # first segment of the current generation (see compaction)
        self.size_hint = 0  # bytes the next segment should hold (set by start_generation), 0: none
        # Where to go back to if the generation being built is abandoned:
        # (generation_start, segment index being appended to or 0, allocated_bytes), as before start_generation.
        self.resume_point: tuple[int, int, int] | None = None
        self.tail = _Tail(self._append_to_new_segment)
        # append(kind, payload) -> AtomPointer: one atom written (the tail's own method, called with no frame here)
        self.append: Callable[[int, bytes], int] = self.tail.append

    @property
    def used(self) -> int:
        """Bytes used in the current segment."""
        return self.tail.used

    @property
    def allocated_bytes(self) -> int:
        """Payload, header and padding bytes appended since start."""
        return self.tail.allocated

    @allocated_bytes.setter
    def allocated_bytes(self, value: int) -> None:
        self.tail.allocated = value

    def _append_to_new_segment(self, kind: int, payload: bytes) -> int:
        """The tail's overflow: an atom that does not fit the current segment goes first in a new one."""
        if len(payload) > MAX_PAYLOAD:
            raise EncodingError(
                f"a single stored value of {len(payload)} bytes exceeds the {MAX_PAYLOAD}-byte "
                f"atom limit; split it (large dicts, lists and sets are split for you)"
            )
        self._open_segment(atom_size(len(payload)))
        return self.tail.append(kind, payload)

    def append_many(self, kind: int, payloads: list[bytes]) -> list[int]:
        """Write atoms of one kind back to back; return their AtomPointers, in order.

        The same atoms, at the same places, as `append` called for each; one
        pass over them into the segment (a bulk load writes millions of small
        records, and each `append` costs a dozen Python steps).
        """
        current = self.current
        written = None
        if current is not None:
            written = _write_atoms(current.buf, self.used, kind, payloads, make_pointer(self.current_index, 0))
        if written is None:  # a new segment on the way, or an error: `append` says which
            return [self.append(kind, payload) for payload in payloads]
        pointers, end = written
        self.allocated_bytes += end - self.used
        self.tail.used = end
        return pointers

    def start_generation(self, expected_bytes: int = 0) -> int:
        """Begin appending in a fresh segment sized for `expected_bytes`; return its index.

        Compaction copies the live data there: sized to it, the copy fits in one
        segment without reserving a quarter of the old generation as well.
        Until the copy is published, `abandon_generation` can take it back.
        """
        self.resume_point = (
            self.generation_start,
            self.current_index if self.current is not None else 0,
            self.allocated_bytes,
        )
        self._finish_current()
        self.generation_start = self.next_index
        self.size_hint = expected_bytes
        return self.next_index

    def open_next_generation(self, expected_bytes: int = 0) -> int:
        """Begin appending in a fresh segment for a copy made in steps; return its index.

        Unlike `start_generation`, the generation still starts where it did, so
        a checkpoint taken meanwhile copies everything the latest root reaches;
        `move_generation_start(index)` moves it once the copy is the latest root.
        """
        self._finish_current()
        self.size_hint = expected_bytes
        return self.next_index

    def move_generation_start(self, index: int) -> None:
        """Make the generation start at segment `index` (see `open_next_generation`)."""
        self.generation_start = index

    def abandon_generation(self) -> int:
        """Undo `start_generation`: unlink the segments made since, append to the previous generation again.

        For a compaction that failed half way (/dev/shm full, or any error):
        the previous generation is whole, `generation()` lists it again and
        the next atom goes where it would have gone. Segment indexes are not
        reused. Returns the bytes freed.
        """
        assert self.resume_point is not None, "abandon_generation() without start_generation()"
        generation_start, resume_index, allocated = self.resume_point
        self._detach()
        freed = sum(self._drop_segment(index) for index in [i for i in self.segments if i >= self.generation_start])
        self.generation_start, self.allocated_bytes, self.size_hint = generation_start, allocated, 0
        if resume_index:
            self._attach(resume_index, self.used_of.pop(resume_index))
        self.resume_point = None
        return freed

    def _attach(self, index: int, used: int) -> None:
        """Append to segment `index` from now on, after its first `used` bytes."""
        self.current, self.current_index = self.segments[index], index
        self.tail.attach(self.current.buf, make_pointer(index, 0), used)

    def _detach(self) -> None:
        self.current = None
        self.tail.detach()

    def _finish_current(self) -> None:
        if self.current is not None:
            self.used_of[self.current_index] = self.used
            self._detach()

    def used_bytes(self, index: int) -> int:
        """Bytes written so far in segment `index`."""
        return self.used if index == self.current_index and self.current is not None else self.used_of[index]

    def generation(self) -> list[tuple[int, int]]:
        """(index, used bytes) of every segment of the current generation: what a checkpoint copies."""
        return [(index, self.used_bytes(index)) for index in sorted(self.segments) if index >= self.generation_start]

    def restore_segment(self, index: int, length: int) -> memoryview:
        """Create segment `index` of `length` bytes for recovery; return its buffer to fill."""
        segment = Segment.create(names.data_name(self.instance_id, index), max(length, 8))
        self.segments[index] = segment
        self.used_of[index] = length
        self.next_index = max(self.next_index, index + 1)
        self.allocated_bytes += length
        return segment.buf

    def _open_segment(self, at_least: int) -> Segment:
        """Create the next segment, big enough for `at_least` bytes, and append there from now on."""
        # A quarter of the current generation: geometric growth (few segments) that
        # reserves at most 25% more than the data needs (segments are fallocated:
        # every byte reserved is memory). Not a quarter of everything mapped: retired
        # generations that a stopped reader pins would make every new segment bigger,
        # and compaction abandons the mostly empty tail of each, so memory grew
        # geometrically with the number of compactions, not with the bytes written.
        size = min(MAX_SEGMENT, max(FIRST_SEGMENT, self.generation_bytes() // 4))
        if self.size_hint:
            size, self.size_hint = min(MAX_SEGMENT, max(FIRST_SEGMENT, self.size_hint)), 0
        size = max(size, at_least + 4096)
        size = (size + FIRST_SEGMENT - 1) // FIRST_SEGMENT * FIRST_SEGMENT
        self._finish_current()
        index = self.next_index
        if index >= MAX_SEGMENTS:
            raise ProtoBaseError(
                f"this instance has used all {MAX_SEGMENTS} segment numbers; restart the "
                f"database (a restart starts numbering again from its checkpoint)"
            )
        segment = Segment.create(names.data_name(self.instance_id, index), size)
        self.next_index += 1
        self.segments[index] = segment
        self._attach(index, 0)
        self.on_new_segment(self.next_index)
        return segment

    def release_below(self, index: int) -> int:
        """Unlink every segment with an index below `index`; return the bytes freed."""
        return sum(self._drop_segment(old) for old in [i for i in self.segments if i < index])

    def _drop_segment(self, index: int) -> int:
        """Unlink and unmap segment `index`; return its size."""
        self.used_of.pop(index, None)
        segment = self.segments.pop(index)
        segment.unlink()
        segment.close()
        return segment.size

    def mapped_bytes(self) -> int:
        """Bytes of every live segment, retired generations awaiting unlink included."""
        return sum(segment.size for segment in self.segments.values())

    def bytes_below(self, index: int) -> int:
        """Bytes of the live segments with an index below `index` (those `release_below(index)` would free)."""
        return sum(segment.size for i, segment in self.segments.items() if i < index)

    def generation_bytes(self) -> int:
        """Bytes of the segments of the current generation."""
        return sum(segment.size for index, segment in self.segments.items() if index >= self.generation_start)

    def close(self, unlink: bool) -> None:
        self._detach()
        for segment in self.segments.values():
            if unlink:
                segment.unlink()
            segment.close()
        self.segments.clear()


class AtomReader:
    """Reads atoms by pointer from any process, mapping segments read-only on demand."""

    def __init__(self, instance_id: str, *, writer: ArenaWriter | None = None) -> None:
        self.instance_id = instance_id
        self.writer = writer  # in the coordinator: read its own writable mappings
        self.buffers: dict[int, memoryview] = {}  # {segment index -> mapped bytes}
        self.segments: dict[int, Segment] = {}  # {segment index -> our read-only mapping}

    def atom(self, ptr: int) -> tuple[int, memoryview]:
        """(kind, payload) of the atom at `ptr`; the payload is a zero-copy view."""
        index = ptr >> OFFSET_BITS
        buf = self.buffers.get(index)
        if buf is None:
            buf = self._map(index, ptr)
        offset = ptr & OFFSET_MASK
        try:
            (word,) = HEADER.unpack_from(buf, offset)
            kind, length = word >> LENGTH_BITS, word & MAX_PAYLOAD
        except struct.error:
            raise CorruptionError(f"atom pointer {ptr:#x} is past the end of segment {index}") from None
        end = offset + HEADER.size + length
        if end > len(buf) or not VALUE <= kind <= INDEXED:
            raise CorruptionError(f"atom {ptr:#x} has a bad header (length {length}, kind {kind}) in segment {index}")
        return kind, buf[offset + HEADER.size : end]

    def _map(self, index: int, ptr: int) -> memoryview:
        if ptr == 0:
            raise CorruptionError("null atom pointer dereferenced")
        if self.writer is not None and index in self.writer.segments:
            segment = self.writer.segments[index]
        else:
            segment = Segment.attach(names.data_name(self.instance_id, index))
            self.segments[index] = segment
        self.buffers[index] = segment.buf
        return segment.buf

    def forget_below(self, index: int) -> bool:
        """Drop mappings of segments below `index` (they were unlinked); True if any were."""
        old = [i for i in self.buffers if i < index]
        for i in old:
            del self.buffers[i]
            segment = self.segments.pop(i, None)
            if segment is not None:
                segment.close()
        return bool(old)

    def close(self) -> None:
        self.buffers.clear()
        for segment in self.segments.values():
            segment.close()
        self.segments.clear()
