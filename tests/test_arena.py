"""Tests of protobase.core.arena's writer: how segments are sized, and how a generation is taken back.

Real segments in /dev/shm, under a fresh instance id that is swept (and
checked empty) after each test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protobase import native
from protobase.core import arena as arena_module
from protobase.core.arena import (
    DICT_LEAF,
    FIRST_SEGMENT,
    INDEXED,
    SET_BRANCH,
    VALUE,
    ArenaWriter,
    AtomReader,
    Tail,
    offset_of,
    segment_of,
    write_atoms,
)
from protobase.shm import instance_entries, new_instance_id, sweep

ATOM = b"x" * ((64 << 10) - 4)  # the payload of a 64 KiB atom (its header is 4 bytes)
ATOM_SIZE = 64 << 10


@pytest.fixture
def arena() -> Iterator[ArenaWriter]:
    """An ArenaWriter of a fresh instance; everything of it is unlinked afterwards."""
    instance = new_instance_id()
    writer = ArenaWriter(instance)
    try:
        yield writer
    finally:
        writer.close(unlink=True)
        assert sweep(instance) == [], "the arena left segments behind"
        assert instance_entries(instance) == []


def fill(arena: ArenaWriter, total: int) -> list[int]:
    """Append 64 KiB atoms until `total` bytes more are allocated; return their pointers."""
    target = arena.allocated_bytes + total
    pointers = []
    while arena.allocated_bytes < target:
        pointers.append(arena.append(VALUE, ATOM))
    return pointers


def sizes(arena: ArenaWriter, first: int) -> list[int]:
    return [arena.segments[index].size for index in sorted(arena.segments) if index >= first]


def test_new_segments_are_sized_by_the_current_generation_not_by_retired_ones(arena):
    fill(arena, 24 << 20)  # the old generation, pinned by a reader: 24 MiB mapped
    first_new = arena.start_generation(1 << 20)
    fill(arena, 4 << 20)
    # A quarter of this generation (at least 1 MiB), not a quarter of the ~28 MiB mapped.
    assert sizes(arena, first_new) == [FIRST_SEGMENT] * 4
    assert arena.generation_bytes() == 4 * FIRST_SEGMENT


def test_an_abandoned_generation_is_unlinked_and_appending_resumes_where_it_was(arena):
    kept = fill(arena, 5 << 19)  # two and a half segments: room left in the current one
    generation, allocated = arena.generation(), arena.allocated_bytes
    current, used = arena.current_index, arena.used
    first_new = arena.start_generation(2 << 20)
    copies = fill(arena, 5 << 20)
    assert {segment_of(ptr) for ptr in copies} >= {first_new, first_new + 1}
    new_names = {arena.segments[index].name for index in arena.segments if index >= first_new}

    freed = sum(sizes(arena, first_new))
    assert arena.abandon_generation() == freed
    assert arena.generation() == generation and arena.allocated_bytes == allocated
    assert not new_names & set(instance_entries(arena.instance_id))
    assert arena.append(VALUE, ATOM) == kept[-1] + ATOM_SIZE  # right after the last atom kept
    assert (arena.current_index, arena.used) == (current, used + ATOM_SIZE)
    assert arena.next_index > first_new  # segment numbers are never reused
    reader = AtomReader(arena.instance_id, writer=arena)
    assert all(bytes(reader.atom(ptr)[1]) == ATOM for ptr in kept)


# -- write_atoms: the pure function and its compiled twin (carena.c) write the same bytes ------------

carena = native.load("protobase.core.carena")
needs_compiled = pytest.mark.skipif(carena is None, reason="the compiled core is not in use")
_BASE = (7 << 40) + 0  # a pointer base, as for segment 7


def _written(write, room: int, offset: int, kind: int, payloads: list[bytes]):
    buf = bytearray(b"\xee" * room)  # not zeros: the padding must be written, not left
    return write(memoryview(buf), offset, kind, payloads, _BASE), bytes(buf)


@needs_compiled
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(max_size=70), max_size=40),
    st.integers(0, 12),
    st.sampled_from([VALUE, DICT_LEAF, INDEXED]),
    st.integers(0, 3000),
)
def test_compiled_write_atoms_writes_the_bytes_and_pointers_of_the_oracle(payloads, offset, kind, room):
    expected = _written(write_atoms, room, offset, kind, payloads)
    assert _written(carena.write_atoms, room, offset, kind, payloads) == expected
    result, buf = expected
    if result is None:  # they did not fit: nothing was written
        assert buf == b"\xee" * room
    else:
        pointers, end = result
        reader_view = memoryview(buf)
        for pointer, payload in zip(pointers, payloads):
            at = pointer - _BASE
            word = int.from_bytes(reader_view[at : at + 4], "little")
            assert (word >> 28, word & ((1 << 28) - 1)) == (kind, len(payload))
            assert reader_view[at + 4 : at + 4 + len(payload)] == payload
        assert end == offset + sum((4 + len(payload) + 3) & ~3 for payload in payloads)


@pytest.mark.parametrize("write", [write_atoms, getattr(carena, "write_atoms", None)], ids=["pure", "compiled"])
def test_write_atoms_refuses_a_payload_that_is_not_bytes_and_writes_nothing(write):
    if write is None:
        pytest.skip("the compiled core is not in use")
    buf = bytearray(64)
    with pytest.raises(TypeError):
        write(memoryview(buf), 0, VALUE, [b"ok", "text"], _BASE)
    assert buf == bytearray(64)


def test_append_many_places_atoms_where_append_would(arena):
    payloads = [bytes([n]) * n for n in range(70)]
    first = arena.append_many(VALUE, payloads[:35])
    second = [arena.append(VALUE, payload) for payload in payloads[35:]]
    reader = AtomReader(arena.instance_id, writer=arena)
    try:
        assert [bytes(reader.atom(pointer)[1]) for pointer in first + second] == payloads
        assert all(b - a == (4 + len(p) + 3) & ~3 for a, b, p in zip(first, first[1:], payloads))
        assert second[0] - first[-1] == (4 + 34 + 3) & ~3
    finally:
        reader.close()
    assert arena_module._write_atoms is (write_atoms if carena is None else carena.write_atoms)


# -- Tail: the pure class and its compiled twin (carena.c) write the same bytes ------------------


def _appended(tail_type, room: int, used: int, appends: list[tuple[int, bytes]]):
    """What a tail of `tail_type` attached to `room` bytes (from `used`) does with `appends`."""
    overflowed: list[tuple[int, bytes]] = []

    def overflow(kind: int, payload: bytes) -> int:
        overflowed.append((kind, payload))
        return -len(overflowed)  # no atom of a segment has a negative pointer

    buf = bytearray(b"\xee" * room)
    tail = tail_type(overflow)
    tail.attach(memoryview(buf), _BASE, used)
    pointers = [tail.append(kind, payload) for kind, payload in appends]
    tail.detach()
    return pointers, overflowed, tail.used, tail.allocated, bytes(buf)


@needs_compiled
@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([VALUE, DICT_LEAF, SET_BRANCH, INDEXED]), st.binary(max_size=90)), max_size=40),
    st.integers(0, 3000),
    st.integers(0, 12),
)
def test_compiled_tail_appends_the_bytes_and_pointers_of_the_oracle(appends, room, used):
    used = min(used, room) & ~3
    expected = _appended(Tail, room, used, appends)
    assert _appended(carena.Tail, room, used, appends) == expected
    pointers, overflowed, end, allocated, _ = expected
    assert end - used == allocated == sum((4 + len(p) + 3) & ~3 for (_, p), at in zip(appends, pointers) if at >= 0)
    assert [append for append, at in zip(appends, pointers) if at < 0] == overflowed  # the ones that did not fit


@pytest.mark.parametrize("tail_type", [Tail, getattr(carena, "Tail", None)], ids=["pure", "compiled"])
def test_a_tail_sends_what_does_not_fit_to_its_overflow_and_refuses_bad_input(tail_type):
    if tail_type is None:
        pytest.skip("the compiled core is not in use")
    sent: list[tuple[int, bytes]] = []
    tail = tail_type(lambda kind, payload: sent.append((kind, payload)) or 99)
    assert tail.append(VALUE, b"abc") == 99  # nothing attached: everything overflows
    buf = bytearray(16)
    with pytest.raises(ValueError, match="17 bytes used of a 16-byte segment"):
        tail.attach(memoryview(buf), _BASE, 17)
    tail.attach(memoryview(buf), _BASE, 4)
    with pytest.raises(TypeError, match="must be bytes"):
        tail.append(VALUE, "text")
    assert buf == bytearray(16) and tail.used == 4  # nothing written
    assert tail.append(DICT_LEAF, b"12345") == _BASE + 4 and tail.used == 16  # 4 + 5 + 3 bytes of padding
    assert tail.append(VALUE, b"") == 99 and sent == [(VALUE, b"abc"), (VALUE, b"")]  # a full segment overflows
    assert tail.allocated == 12


def test_the_arena_appends_through_the_compiled_tail_and_lets_its_segment_go(arena):
    assert type(arena.tail) is (Tail if carena is None else carena.Tail)
    pointer = arena.append(VALUE, b"payload")
    buf = arena.current.buf
    at = offset_of(pointer)
    assert bytes(buf[at : at + 11]) == (VALUE << 28 | 7).to_bytes(4, "little") + b"payload"
    arena.close(unlink=True)
    with pytest.raises(ValueError):  # released: the tail held no export of it, so the segment was unmapped
        buf[0]
