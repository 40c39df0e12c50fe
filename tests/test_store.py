"""Tests of protobase.core.store: reading atoms as objects through the per-process caches.

Atoms are appended to real segments by an ArenaWriter (as the coordinator
does) and read back by a Store over an AtomReader that attaches them
read-only (as a client does). Each test's instance is swept, and checked
empty, afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from protobase.core import codec
from protobase.core.arena import (
    DICT_BRANCH,
    DICT_LEAF,
    INDEXED,
    LIST_BRANCH,
    LIST_LEAF,
    SET_BRANCH,
    SET_LEAF,
    VALUE,
    ArenaWriter,
    AtomReader,
)
from protobase.core.btree import MAX_ENTRIES, Node, TreeWriter, encode_node
from protobase.core.codec import Ref
from protobase.core.frozen import FrozenDict, FrozenList
from protobase.core.store import Store
from protobase.core.views import IndexedTreeDict, TreeDict, TreeList, TreeSet
from protobase.errors import CorruptionError, ReadOnlyError
from protobase.shm import instance_entries, new_instance_id, sweep


class Atoms:
    """An arena to write atoms into and a Store reading them back read-only."""

    def __init__(self, arena: ArenaWriter, store: Store) -> None:
        self.arena = arena
        self.store = store
        self.trees = TreeWriter(store.node)

    def value(self, value: Any) -> Ref:
        """A VALUE atom holding `value`."""
        return Ref(self.arena.append(VALUE, codec.encode(value)), VALUE)

    def tree(self, leaf_kind: int, keys: list[Any] | None, values: list[Any] | None) -> int:
        """The root pointer of a tree built from sorted `keys` and/or `values`."""
        root = self.trees.build(leaf_kind, keys, values)
        return self.trees.flush(root, self.write_node, lambda value: value)

    def write_node(self, node: Node) -> int:
        return self.arena.append(node.kind, encode_node(node))


@pytest.fixture
def atoms() -> Iterator[Atoms]:
    instance = new_instance_id()
    arena = ArenaWriter(instance)
    reader = AtomReader(instance)  # no writer: data segments are attached read-only, as in a client
    try:
        yield Atoms(arena, Store(reader, object_cache=64, bytes_cache=64))
    finally:
        reader.close()
        arena.close(unlink=True)
        assert sweep(instance) == [], "the arena left segments behind"
        assert instance_entries(instance) == []


def test_an_atom_is_read_once_then_served_from_the_bytes_cache(atoms: Atoms) -> None:
    ref = atoms.value({"city": "Paris"})
    store = atoms.store
    kind, payload = store.atom(ref.ptr)
    assert kind == VALUE and bytes(payload) == codec.encode({"city": "Paris"})
    assert payload.readonly  # a client's mapping: a stray write raises instead of corrupting
    assert store.atom(ref.ptr)[1] is payload
    assert (store.bytes.hits, store.bytes.misses) == (1, 1)


def test_a_node_is_decoded_once_and_comes_back_clean(atoms: Atoms) -> None:
    ptr = atoms.tree(DICT_LEAF, ["a", "b"], [1, 2])
    node = atoms.store.node(ptr)
    assert (node.kind, node.keys, node.values, node.ptr) == (DICT_LEAF, ["a", "b"], [1, 2], ptr)
    assert atoms.store.node(ptr) is node


def test_a_node_pointer_that_holds_no_node_is_corruption(atoms: Atoms) -> None:
    ref = atoms.value("not a node")
    with pytest.raises(CorruptionError, match="does not have the node shape"):
        atoms.store.node(ref.ptr)


def test_a_value_comes_back_frozen_and_cached(atoms: Atoms) -> None:
    ref = atoms.value({"items": ["apple", "pear"], "total": 3})
    value = atoms.store.value(ref)
    assert value == {"items": ["apple", "pear"], "total": 3}
    assert type(value) is FrozenDict and type(value["items"]) is FrozenList
    with pytest.raises(ReadOnlyError):
        value["total"] = 4
    assert atoms.store.value(ref) is value  # one decoded object serves every read


def test_a_ref_inside_a_value_resolves_to_the_view_of_its_tree(atoms: Atoms) -> None:
    tree = atoms.tree(LIST_LEAF, None, list(range(300)))
    ref = atoms.value({"log": Ref(tree, LIST_BRANCH)})
    log = atoms.store.value(ref)["log"]
    assert type(log) is TreeList and log.ptr == tree
    assert list(log) == list(range(300))


@pytest.mark.parametrize(
    ("leaf_kind", "view_class", "keys", "values", "expected"),
    [
        (DICT_LEAF, TreeDict, ["a", "b"], [1, 2], {"a": 1, "b": 2}),
        (SET_LEAF, TreeSet, [1, 2, 3], None, {1, 2, 3}),
        (LIST_LEAF, TreeList, None, ["x", "y"], ["x", "y"]),
    ],
)
def test_each_tree_kind_gets_its_view(
    atoms: Atoms, leaf_kind: int, view_class: type, keys: list[Any] | None, values: list[Any] | None, expected: Any
) -> None:
    ptr = atoms.tree(leaf_kind, keys, values)
    view = atoms.store.view(ptr, leaf_kind)
    assert type(view) is view_class and view.ptr == ptr
    assert (dict(view) if leaf_kind == DICT_LEAF else set(view) if leaf_kind == SET_LEAF else list(view)) == expected
    assert atoms.store.view(ptr, leaf_kind) is view  # cached under the negated pointer
    assert atoms.store.objects.get(-ptr) is view


@pytest.mark.parametrize(
    ("branch_kind", "leaf_kind", "view_class"),
    [
        (DICT_BRANCH, DICT_LEAF, TreeDict),
        (SET_BRANCH, SET_LEAF, TreeSet),
        (LIST_BRANCH, LIST_LEAF, TreeList),
    ],
)
def test_a_tree_with_branches_gets_the_view_of_its_leaf_kind(
    atoms: Atoms, branch_kind: int, leaf_kind: int, view_class: type
) -> None:
    n = MAX_ENTRIES * 3
    keys = None if leaf_kind == LIST_LEAF else list(range(n))
    values = None if leaf_kind == SET_LEAF else list(range(n))
    ptr = atoms.tree(leaf_kind, keys, values)
    assert atoms.store.node(ptr).kind == branch_kind
    view = atoms.store.view(ptr, branch_kind)
    assert type(view) is view_class and len(view) == n


def test_the_empty_tree_is_an_empty_view_and_is_not_cached(atoms: Atoms) -> None:
    store = atoms.store
    for leaf_kind, view_class in ((DICT_LEAF, TreeDict), (SET_LEAF, TreeSet), (LIST_LEAF, TreeList)):
        view = store.view(0, leaf_kind)
        assert type(view) is view_class and len(view) == 0
    assert store.objects.data == {}
    assert type(store.root(0)) is TreeDict


def test_an_indexed_collection_is_an_indexed_view_of_its_data_tree(atoms: Atoms) -> None:
    data = atoms.tree(DICT_LEAF, ["u1", "u2"], [atoms.value({"city": "Paris"}), atoms.value({"city": "Rome"})])
    ptr = atoms.arena.append(INDEXED, codec.encode({"data": data, "indexes": {}}))
    view = atoms.store.value(Ref(ptr, INDEXED))
    assert type(view) is IndexedTreeDict and view.ptr == data
    assert dict(view) == {"u1": {"city": "Paris"}, "u2": {"city": "Rome"}}
    assert atoms.store.value(Ref(ptr, INDEXED)) is view


def test_resolve_passes_scalars_and_resolves_refs(atoms: Atoms) -> None:
    ref = atoms.value([1, 2])
    assert atoms.store.resolve(7) == 7 and atoms.store.resolve(None) is None
    assert atoms.store.resolve(ref) == [1, 2]


def test_write_through_makes_the_next_read_a_hit_without_decoding(atoms: Atoms) -> None:
    ref = atoms.value({"n": 1})
    written = FrozenDict({"n": 1})
    atoms.store.write_through(ref.ptr, written)
    assert atoms.store.value(ref) is written
    assert atoms.store.bytes.misses == 0  # the atom was never read


def test_clear_empties_both_caches_and_the_next_read_decodes_again(atoms: Atoms) -> None:
    ref = atoms.value({"n": 1})
    first = atoms.store.value(ref)
    atoms.store.clear()
    assert atoms.store.objects.data == {} and atoms.store.bytes.data == {}
    again = atoms.store.value(ref)
    assert again == first and again is not first


def test_reads_past_the_cache_capacity_stay_bounded_and_correct(atoms: Atoms) -> None:
    refs = [atoms.value({"i": i}) for i in range(500)]
    for _ in range(2):
        for i, ref in enumerate(refs):
            assert atoms.store.value(ref) == {"i": i}
            assert len(atoms.store.objects.data) <= 64 and len(atoms.store.bytes.data) <= 64
    assert atoms.store.objects.misses >= 1000 - 64  # the second pass found almost nothing left
