"""client/check.py: db.check() walks every atom from the root and names the first broken invariant."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from protobase.client.check import AtomWalk, check_database
from protobase.core.arena import DICT_LEAF, INDEXED, VALUE, make_pointer, segment_of
from protobase.core.codec import Ref
from protobase.errors import CorruptionError
from protobase.shm.control import ReaderSlot


@pytest.fixture
def filled(db):
    """A database with records, a large tree list, a nested value and an index."""
    with db.transaction() as tx:
        tx.root["users"] = {f"u{n}": {"city": "Paris" if n % 2 else "Rome", "n": n} for n in range(300)}
        tx.root["log"] = list(range(2000))
        tx.root["config"] = {"nested": {"deep": [1, 2, {"x": 3}]}}
    with db.transaction() as tx:
        tx.root["users"].create_index("city")
    return db


def test_a_healthy_database_passes_and_every_atom_is_counted(filled):
    with filled.snapshot() as snapshot:
        visited = check_database(filled.session, snapshot)
    assert visited > 0
    filled.check()


def test_a_pointer_into_a_reclaimed_segment_is_corruption(filled):
    store = filled.session.store
    stale = make_pointer(3, 64)
    with pytest.raises(CorruptionError, match=r"segment 3, which was reclaimed \(oldest live segment is 4\)"):
        AtomWalk(store, oldest_segment=4).visit(Ref(stale, VALUE))


def test_a_reference_of_an_unknown_kind_is_corruption(filled):
    with filled.snapshot() as snapshot:
        walk = AtomWalk(filled.session.store, segment_of(snapshot.root.ptr))
        with pytest.raises(CorruptionError, match="has unknown kind 99"):
            walk.visit(Ref(snapshot.root.ptr, 99))


def test_a_reference_to_an_atom_of_another_kind_is_corruption(filled):
    with filled.snapshot() as snapshot:
        root = snapshot.root.ptr  # a tree node, not a value
        walk = AtomWalk(filled.session.store, segment_of(root))
        with pytest.raises(CorruptionError, match="expects a value atom, found kind"):
            walk.visit(Ref(root, VALUE))
        with pytest.raises(CorruptionError, match="expects an indexed collection, found kind"):
            walk.visit(Ref(root, INDEXED))


class Records(dict):
    ptr = 0x1234  # where the collection would be


def test_an_index_that_disagrees_with_its_records_is_corruption(filled):
    walk = AtomWalk(filled.session.store, 0)
    records = Records(alice={"city": "Paris"})
    with pytest.raises(
        CorruptionError,
        match=r"index on 'city' of collection 0x1234 disagrees with its records: "
        r"1 entries missing .* 0 extra",
    ):
        walk.index_contents(records, "city", 0)  # an empty index


def test_a_reader_holding_a_snapshot_newer_than_the_latest_commit_is_corruption(filled):
    session = filled.session
    control = SimpleNamespace(
        oldest_segment=0,
        read_root=lambda: (10, 0),
        readers=lambda: [ReaderSlot(slot=2, pid=99, start_time=0.0, snapshot_seq=11)],
    )
    empty = SimpleNamespace(root=SimpleNamespace(ptr=0))
    with pytest.raises(CorruptionError, match="reader slot 2 \\(pid 99\\) holds snapshot 11, newer than the latest"):
        check_database(SimpleNamespace(store=session.store, control=control), empty)


def test_walking_the_same_tree_twice_counts_it_twice(filled):
    with filled.snapshot() as snapshot:
        walk = AtomWalk(filled.session.store, 0)
        walk.tree(snapshot.root.ptr, DICT_LEAF)
        once = walk.visited
        walk.tree(snapshot.root.ptr, DICT_LEAF)
    assert once > 0 and walk.visited == 2 * once
