"""Tests of protobase.core.arena's writer: how segments are sized, and how a generation is taken back.

Real segments in /dev/shm, under a fresh instance id that is swept (and
checked empty) after each test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from protobase.core.arena import FIRST_SEGMENT, VALUE, ArenaWriter, AtomReader, segment_of
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
