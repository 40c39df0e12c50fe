"""The coordinator's writer (coordinator/writer.py) on a real arena: apply, flush, copy_root, decode_ops.

Each test builds roots with `Writer.apply` and `Writer.flush` into the
segments of a fresh instance in /dev/shm (swept and checked empty after it),
and reads them back through a Store of its own, as a client process would:
what a flush wrote is what a reader sees; an operation that fails leaves the
root it was applied to as it was; the layout follows the Settings' limits; a
compaction's copy holds the same data in the new generation only.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from protobase.coordinator.writer import Writer, decode_ops
from protobase.core import codec
from protobase.core.arena import DICT_LEAF, INDEXED, LIST_BRANCH, SET_LEAF, VALUE, ArenaWriter, AtomReader, segment_of
from protobase.core.codec import Ref
from protobase.core.frozen import thaw
from protobase.core.store import Store
from protobase.errors import CorruptionError, EncodingError, PathError
from protobase.settings import Settings
from protobase.shm import instance_entries, new_instance_id, sweep
from protobase.wire.opcodes import (
    LIST_APPEND,
    LIST_DELETE,
    LIST_INSERT,
    LIST_SET,
    OP_CREATE_INDEX,
    OP_DELETE,
    OP_INCR,
    OP_LIST,
    OP_SET,
    OP_SET_ADD,
    OP_SET_DISCARD,
)


class Fixture:
    """A writer on a fresh arena, and a way to read what it wrote as another process would."""

    def __init__(self, settings: Settings) -> None:
        self.instance = new_instance_id()
        self.arena = ArenaWriter(self.instance)
        self.writer = Writer(self.arena, Store(AtomReader(self.instance, writer=self.arena)), settings)
        self.readers: list[AtomReader] = []

    def commit(self, root: Any, *ops: tuple[int, tuple[Any, ...], Any]) -> int:
        """Apply `ops` to `root` and flush: the new root pointer."""
        for code, path, argument in ops:
            root = self.writer.apply(root, code, path, argument)
        return self.writer.flush(root)

    def read(self, root: int) -> Any:
        """The whole database at `root`, as plain data, through a Store that maps the segments read-only."""
        reader = AtomReader(self.instance)
        self.readers.append(reader)
        return thaw(Store(reader).root(root))

    def slot(self, root: int, key: Any) -> Any:
        """What the root's leaf holds for `key`: a scalar, or a Ref to where the value lives."""
        node = self.writer.store.node(root)
        assert node.kind == DICT_LEAF, "a small root is one leaf"
        return node.values[node.keys.index(key)]

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.writer.store.reader.close()
        self.arena.close(unlink=True)


@pytest.fixture
def make() -> Iterator[Any]:
    made: list[Fixture] = []

    def build(**settings: Any) -> Fixture:
        made.append(Fixture(Settings(**settings)))
        return made[-1]

    yield build
    for fixture in made:
        fixture.close()
        assert sweep(fixture.instance) == [], "the arena left segments behind"
        assert instance_entries(fixture.instance) == []


# -- apply and flush --------------------------------------------------------------------------


def test_what_a_flush_writes_is_what_a_reader_of_the_segments_sees(make):
    store = make()
    root = store.commit(
        0,
        (OP_SET, ("users",), {}),
        (OP_SET, ("users", "alice"), {"city": "Paris", "tags": ["a"]}),
        (OP_SET, ("n",), 7),
        (OP_SET, ("users", "alice", "city"), "Lyon"),
    )
    assert store.read(root) == {"users": {"alice": {"city": "Lyon", "tags": ["a"]}}, "n": 7}
    root = store.commit(root, (OP_DELETE, ("users", "alice"), None), (OP_DELETE, ("no such key",), None))
    assert store.read(root) == {"users": {}, "n": 7}


def test_a_failed_operation_leaves_the_root_it_was_applied_to_as_it_was(make):
    store = make()
    before = store.commit(0, (OP_SET, ("d",), {"k": [1, 2]}), (OP_SET, ("big",), list(range(300))))
    working = store.writer.apply(before, OP_SET, ("d", "k2"), 3)  # a working copy, not yet flushed
    with pytest.raises(PathError, match=r"^no container at \('missing', 'x'\): the key is missing$"):
        store.writer.apply(working, OP_SET, ("missing", "x"), 1)
    with pytest.raises(PathError, match=r"^list index 500 out of range at "):
        store.writer.apply(working, OP_SET, ("big", 500), 1)
    with pytest.raises(PathError, match="^an operation needs a non-empty key path$"):
        store.writer.apply(before, OP_SET, (), 1)
    # Regression: below the root, the error named only what was left of the path, ('missing', 'x').
    with pytest.raises(PathError, match=r"^no container at \('d', 'missing', 'x'\): the key is missing$"):
        store.writer.apply(working, OP_SET, ("d", "missing", "x"), 1)
    with pytest.raises(PathError, match=r"^list index 9 out of range at \('d', 'k', 9\)$"):
        store.writer.apply(working, OP_SET, ("d", "k", 9), 1)
    assert store.read(before) == {"d": {"k": [1, 2]}, "big": list(range(300))}
    assert store.read(store.writer.flush(working)) == {"d": {"k": [1, 2], "k2": 3}, "big": list(range(300))}


def test_list_operations_on_a_small_list_and_on_a_tree_list_agree_with_a_python_list(make):
    store = make(flat_list_entries=8)
    for length in (5, 40):  # one atom, then a tree (over flat_list_entries)
        model = list(range(length))
        ops = [
            [LIST_APPEND, 0, "end"],
            [LIST_INSERT, 2, "two"],
            [LIST_SET, -1, "last"],
            [LIST_DELETE, 0, None],
            [LIST_INSERT, -100, "first"],
        ]
        # A copy: the writer owns what it is given (a commit's decoded ops), and changes it in place.
        root = store.commit(0, (OP_SET, ("l",), list(model)), (OP_LIST, ("l",), ops))
        model.append("end")
        model.insert(2, "two")
        model[-1] = "last"
        del model[0]
        model.insert(0, "first")
        assert store.read(root) == {"l": model}
        assert type(store.slot(root, "l")) is Ref and (store.slot(root, "l").kind == VALUE) == (length == 5)


def test_set_operations_add_and_discard_in_small_and_tree_sets(make):
    store = make(flat_set_entries=4)
    for elements in ({1, 2}, set(range(10))):
        root = store.commit(
            0, (OP_SET, ("s",), set(elements)), (OP_SET_ADD, ("s",), [100, 1]), (OP_SET_DISCARD, ("s",), [2, 999])
        )
        assert store.read(root) == {"s": (elements | {100}) - {2}}
    with pytest.raises(PathError, match=r"^set operation on a str at \('n',\)$"):
        store.commit(root, (OP_SET, ("n",), "text"), (OP_SET_ADD, ("n",), [1]))


def test_an_index_follows_the_records_it_indexes(make):
    store = make()
    users = {"alice": {"city": "Paris"}, "bob": {"city": "Oslo"}}
    root = store.commit(
        0,
        (OP_SET, ("users",), users),
        (OP_CREATE_INDEX, ("users",), "city"),
        (OP_SET, ("users", "alice", "city"), "Lyon"),
        (OP_DELETE, ("users", "bob"), None),
    )
    assert store.read(root) == {"users": {"alice": {"city": "Lyon"}}}
    slot = store.slot(root, "users")
    assert slot.kind == INDEXED
    fields = codec.decode(store.writer.store.atom(slot.ptr)[1], frozen=False)
    entries = list(store.writer.access.keys(fields["indexes"]["city"], SET_LEAF))
    assert [(value, key) for _, value, key in entries] == [("Lyon", "alice")]


def test_a_stored_number_is_never_taken_for_a_tree_pointer(make):
    # An int in a slot is a number; only a Ref points at an atom. A client that
    # stores the offset of another tree as a number, then writes below it, must
    # be refused, not handed that tree (or garbage at any offset) as a container.
    store = make(flat_dict_entries=2)
    root = store.commit(0, (OP_SET, ("t",), {f"k{i}": i for i in range(40)}))
    pointer = store.slot(root, "t").ptr
    root = store.commit(root, (OP_SET, ("n",), pointer), (OP_SET, ("small",), {"m": pointer}))
    below_a_number = [
        (OP_SET, ("n", "x"), 1),
        (OP_DELETE, ("n", "k1"), None),
        (OP_LIST, ("n",), [[LIST_APPEND, 0, 1]]),
        (OP_SET_ADD, ("n",), [1]),
        (OP_CREATE_INDEX, ("n",), "city"),
        (OP_SET, ("small", "m", "x"), 1),
        (OP_SET, ("n", "x", "y"), 1),
    ]
    for code, path, argument in below_a_number:
        with pytest.raises(PathError, match=r"^no container at .*: a key on the way holds a number, not a container$"):
            store.writer.apply(root, code, path, argument)
    merged = [(OP_SET, ("n", f"key{i}"), i) for i in range(40)]  # enough for a bulk merge
    with pytest.raises(PathError, match=r"^no container at .*: a key on the way holds a number, not a container$"):
        store.writer.apply_all(root, merged)
    assert store.read(root)["n"] == pointer


# -- the layout, from the Settings --------------------------------------------------------------


@pytest.mark.parametrize("entries, stored_as", [(4, VALUE), (5, DICT_LEAF)])
def test_a_dict_over_flat_dict_entries_becomes_a_tree(make, entries, stored_as):
    store = make(flat_dict_entries=4)
    value = {f"k{i}": i for i in range(entries)}
    root = store.commit(0, (OP_SET, ("d",), value))
    assert store.slot(root, "d").kind == stored_as
    assert store.read(root) == {"d": value}


def test_a_list_over_flat_list_entries_becomes_a_tree_of_trees(make):
    store = make(flat_list_entries=2)
    root = store.commit(0, (OP_SET, ("l",), list(range(200))))
    assert store.slot(root, "l").kind == LIST_BRANCH  # 200 items: more than one leaf
    assert store.read(root) == {"l": list(range(200))}


def test_a_few_large_entries_over_flat_max_bytes_become_a_tree(make):
    store = make()  # 16 KiB; values of 500 characters sit inline (inline_bytes 512)
    small = {f"k{i}": "x" * 500 for i in range(20)}  # about 10 KB: one atom
    large = {f"k{i}": "x" * 500 for i in range(40)}  # about 20 KB: a tree, though 40 <= 64 entries
    root = store.commit(0, (OP_SET, ("small",), small), (OP_SET, ("large",), large))
    assert (store.slot(root, "small").kind, store.slot(root, "large").kind) == (VALUE, DICT_LEAF)
    assert store.read(root) == {"small": small, "large": large}


def test_strings_over_inline_bytes_get_an_atom_of_their_own(make):
    store = make(inline_bytes=8)
    root = store.commit(0, (OP_SET, ("short",), "x" * 8), (OP_SET, ("long",), "x" * 9), (OP_SET, ("b",), b"y" * 9))
    assert store.slot(root, "short") == "x" * 8
    assert store.slot(root, "long").kind == store.slot(root, "b").kind == VALUE
    assert store.read(root) == {"short": "x" * 8, "long": "x" * 9, "b": b"y" * 9}


def test_flat_pointer_names_one_atom_values_only(make):
    store = make(flat_dict_entries=4)
    flat, holding_a_tree = {"a": 1}, {"inner": {f"k{i}": i for i in range(5)}}
    root = store.commit(0, (OP_SET, ("flat",), flat), (OP_SET, ("nested",), holding_a_tree))
    ptr = store.writer.flat_pointer(flat)
    assert ptr == store.slot(root, "flat").ptr
    assert codec.decode(store.writer.store.atom(ptr)[1], frozen=False) == {"a": 1}
    assert store.writer.flat_pointer(holding_a_tree) is None  # its atom holds a Ref: not the value itself


def test_replacing_a_value_counts_its_atom_as_discarded(make):
    store = make()
    root = store.commit(0, (OP_SET, ("v",), {"blob": "x" * 2000}))
    before = store.writer.discarded_bytes
    store.commit(root, (OP_SET, ("v",), 1))
    assert store.writer.discarded_bytes > before + 2000


# -- compaction -------------------------------------------------------------------------------


def test_copy_root_copies_everything_reachable_into_the_new_generation(make):
    store = make(flat_dict_entries=4)
    data = {
        "users": {f"u{i}": {"name": "n" * 600, "tags": {i, -i}} for i in range(30)},
        "l": list(range(300)),
        "t": (1, ("nested", b"z" * 700)),
    }
    root = store.commit(
        0,
        (OP_SET, ("users",), data["users"]),
        (OP_SET, ("l",), data["l"]),
        (OP_SET, ("t",), data["t"]),
        (OP_CREATE_INDEX, ("users",), "name"),
    )
    first_new = store.arena.start_generation()
    copy = store.writer.copy_root(root)
    assert copy != root and segment_of(copy) >= first_new
    store.writer.store.clear()
    assert store.read(copy) == store.read(root) == data
    store.arena.release_below(first_new)  # the old generation gone: the copy must not point into it
    assert store.read(copy) == data


# -- decode_ops ----------------------------------------------------------------------------------


def _packed_in(value: Any) -> int:
    """How many Packed records `value` holds, at any depth."""
    if type(value) is codec.Packed:
        return 1
    if type(value) is codec.SortedEntries:
        return sum(_packed_in(item) for item in value.values)
    if isinstance(value, dict):
        return sum(_packed_in(item) for item in value.values())
    if isinstance(value, list):
        return sum(_packed_in(item) for item in value)
    return 0


def test_records_kept_as_their_bytes_are_stored_byte_for_byte_as_their_dicts_would_be(make):
    # decode_ops with the writer's `records` keeps small plain records as Packed, and the writer
    # stores their bytes as they are. Every way of using a record in the commit that set it (a
    # write below it, an increment, an index, a merge, a list) must give the atoms the dicts give.
    users = {f"u{i:04d}": {"id": i, "name": f"user{i}", "score": i % 7, "ok": i % 2 == 0} for i in range(300)}
    users["u0001"] = {"id": 1, "tags": ["a", "b"]}  # not plain: a list inside
    users["u0002"] = {"id": 2, "bio": "x" * 200}  # not plain: text over inline_bytes
    users["u0003"] = {"id": 3, "name": "Zoë"}  # not plain: not ASCII
    ops = [
        [OP_SET, ["users"], users],
        [OP_SET, ["cfg"], {"a": 1, "b": 2.5, "c": None}],
        [OP_SET, ["users", "u0004", "name"], "renamed"],
        [OP_INCR, ["users", "u0005", "score"], 10],
        [OP_CREATE_INDEX, ["users"], "score"],
        *([OP_SET, ["users", f"n{i:02d}"], {"id": i, "score": 3}] for i in range(20)),
        [OP_SET, ["log"], [{"at": 1}, {"at": 2}]],
        [OP_LIST, ["log"], [[LIST_APPEND, None, {"at": 3}]]],
        [OP_SET, ["nested"], {"inner": {"x": 1}, "list": [1]}],
    ]
    encoded = codec.encode(ops)
    fixtures = []
    for keep_records in (False, True):
        store = make()
        decoded = decode_ops(encoded, store.writer.records if keep_records else None)
        assert (_packed_in(decoded) > 300) is keep_records  # the test exercises what it says
        root = store.writer.apply_all(0, [(code, tuple(path), argument) for code, path, argument in decoded])
        fixtures.append((store, store.writer.flush(root)))
    (plain, plain_root), (packed, packed_root) = fixtures
    assert packed_root == plain_root and packed.arena.used == plain.arena.used
    assert bytes(packed.arena.current.buf[: packed.arena.used]) == bytes(plain.arena.current.buf[: plain.arena.used])
    read = packed.read(packed_root)
    assert read["users"]["u0004"] == {"id": 4, "name": "renamed", "score": 4, "ok": True}
    assert read["users"]["u0005"]["score"] == 15 and read["users"]["n07"] == {"id": 7, "score": 3}
    assert read["log"] == [{"at": 1}, {"at": 2}, {"at": 3}] and read["nested"] == {"inner": {"x": 1}, "list": [1]}
    slot = packed.slot(packed_root, "users")
    indexes = codec.decode(packed.writer.store.atom(slot.ptr)[1], frozen=False)["indexes"]
    entries = list(packed.writer.access.keys(indexes["score"], SET_LEAF))
    assert sum(1 for _, score, _ in entries if score == 3) == 20 + sum(
        1 for key, user in read["users"].items() if user.get("score") == 3 and not key.startswith("n")
    )


def test_deleting_a_missing_key_of_a_dict_tree_leaves_the_tree_in_its_parent(make):
    """Regression: an op that changed nothing returned the tree's pointer, which its parent then
    stored as a number: a raw DELETE of a key already gone made `users` an int, its records lost."""
    store = make()
    users = {f"u{i}": {"n": i} for i in range(300)}  # a tree, over flat_dict_entries
    sets = {"s": set(range(300)), "log": list(range(300))}
    root = store.commit(0, (OP_SET, ("users",), users), (OP_SET, ("sets",), sets))
    root = store.commit(root, (OP_DELETE, ("users", "no such user"), None))
    root = store.commit(root, (OP_DELETE, ("sets", "s", "no such key"), None))
    root = store.commit(root, (OP_SET_DISCARD, ("sets", "s"), ["no such element"]))
    root = store.commit(root, (OP_LIST, ("sets", "log"), []))
    assert store.read(root) == {"users": users, "sets": sets}


def test_single_key_updates_written_in_the_nodes_bytes_are_the_atoms_path_copying_writes(make, monkeypatch):
    # Writer._spliced sets a key's value at a path of dict trees in the nodes' bytes
    # (Searcher.splice), through an indexed collection too, its index entries with it; every
    # commit of this mix, one op each, applied that way where it qualifies and by path copying
    # where not, must write exactly what path copying alone writes, count the same garbage and
    # name the same values for the client's write-through.
    rng = random.Random(11)

    def first() -> list[tuple[int, tuple[Any, ...], Any]]:  # new objects each time: a commit owns its ops' values
        return [
            (OP_SET, ("users",), {f"u{i:05d}": {"n": i} for i in range(3000)}),
            (OP_SET, ("cfg",), {"a": 1}),  # a flat dict: rewritten whole
            (OP_SET, ("big",), {f"k{i}": {"deep": {"x": i}} for i in range(200)}),
            (OP_SET, ("counts",), {f"c{i}": i for i in range(100)}),
            (OP_SET, ("people",), {f"p{i:04d}": {"city": f"c{i % 7}", "n": i} for i in range(500)}),
            (OP_CREATE_INDEX, ("people",), "city"),
            (OP_SET, ("tenants",), {f"t{i}": {f"p{j}": {"city": f"c{j % 3}"} for j in range(40)} for i in range(20)}),
            (OP_CREATE_INDEX, ("tenants", "t3"), "city"),
        ]

    commits = []
    for i in range(400):
        key = f"u{rng.randrange(3000):05d}"
        person, tenant = rng.randrange(500), rng.randrange(40)
        commits.append(
            rng.choice(
                [
                    (OP_SET, ("users", key), {"n": -i, "name": f"x{i}"}),  # spliced
                    (OP_SET, ("users", key), {"n": -i, "bio": "y" * 300}),  # spliced: a Ref to a long value
                    (OP_SET, ("users", key), i),  # spliced: a scalar
                    (OP_SET, ("users", f"new{i}"), {"n": i}),  # a new key
                    (OP_SET, ("users", f"{key}x"), {"n": i}),  # a new key anywhere in a full leaf: it splits
                    (OP_DELETE, ("users", key), None),
                    (OP_SET, ("cfg", "a"), i),  # inside a flat dict: path copying
                    (OP_SET, ("big", f"k{rng.randrange(200)}", "deep"), {"y": i}),  # spliced, two trees down
                    (OP_SET, ("users", key, "n"), i),  # below a flat record: path copying
                    (OP_SET, ("counts", f"c{rng.randrange(100)}"), i),  # spliced
                    (OP_INCR, ("counts", f"c{rng.randrange(100)}"), rng.choice([1, -2, 0.5])),  # spliced
                    (OP_INCR, ("counts", f"new{rng.randrange(100)}"), 1),  # a new key: path copying
                    # indexed: spliced while the record's city stays, path copying when it moves
                    (OP_SET, ("people", f"p{person:04d}"), {"city": f"c{person % 7}", "n": -i}),
                    (OP_SET, ("people", f"p{person:04d}"), {"city": "moved", "n": -i}),
                    (OP_SET, ("people", f"new{i}"), {"n": i}),  # no city: a new key spliced in
                    (OP_SET, ("people", f"newc{i}"), {"city": f"c{i % 7}"}),  # a new key and its entry
                    (OP_SET, ("people", f"p{person:04d}"), {"n": i}),  # its entry removed
                    (OP_INCR, ("people", f"count{rng.randrange(5)}"), 1),
                    (OP_DELETE, ("people", f"p{person:04d}"), None),
                    (OP_SET, ("tenants", "t3", f"p{tenant}"), {"city": f"c{tenant % 3}", "x": i}),
                ]
            )
        )
    outcomes = []
    spliced_into_collections: list[tuple[Any, bool]] = []  # (collection, whether its indexes changed)
    for splice in (False, True):
        store = make(flat_dict_entries=16)
        if not splice:
            monkeypatch.setattr(store.writer, "_spliced", lambda root, path, code, argument: None)
        else:
            monkeypatch.setattr(
                store.writer, "_spliced_into_collection", counting(store.writer, spliced_into_collections)
            )
        root = store.commit(0, *first())
        named = []
        for code, path, argument in commits:
            store.writer.begin()
            root = store.commit(root, (code, path, argument))
            named.append(store.writer.flat_pointer(argument))
        outcomes.append((store, root, named, store.writer.discarded_bytes))
        monkeypatch.undo()
    (copied, copied_root, copied_named, copied_garbage), (spliced, spliced_root, spliced_named, spliced_garbage) = (
        outcomes
    )
    assert spliced_root == copied_root and spliced.arena.used == copied.arena.used
    used = copied.arena.used
    assert bytes(spliced.arena.current.buf[:used]) == bytes(copied.arena.current.buf[:used])
    assert spliced_named == copied_named and sum(1 for ptr in spliced_named if ptr) > 50
    assert spliced_garbage == copied_garbage
    assert spliced.read(spliced_root) == copied.read(copied_root)
    assert {name for name, _ in spliced_into_collections} == {"people", "tenants"}
    assert len(spliced_into_collections) > 100
    assert sum(upkept for _, upkept in spliced_into_collections) > 30  # index entries spliced too


def counting(writer: Writer, log: list[tuple[Any, bool]]) -> Any:
    """Writer._spliced_into_collection, logging each collection it writes and whether its indexes changed."""
    into_collection = writer._spliced_into_collection

    def counted(old: Ref, path: tuple[Any, ...], code: int, argument: Any) -> bytes:
        entry = into_collection(old, path, code, argument)
        indexes = [
            codec.decode(writer.store.atom(ref.ptr)[1], frozen=False)["indexes"] for ref in (old, codec.decode(entry))
        ]
        log.append((path[0], indexes[0] != indexes[1]))
        return entry

    return counted


def test_a_value_named_for_write_through_is_named_until_the_next_working_root_begins(make):
    store = make()
    root = store.commit(0, (OP_SET, ("users",), {f"u{i}": {"n": i} for i in range(100)}))
    record = {"n": -1}
    root = store.writer.apply(root, OP_SET, ("users", "u5"), record)  # spliced: written at once
    ptr = store.writer.flat_pointer(record)
    assert ptr is not None and store.writer.flush(root) == root
    assert store.writer.flat_pointer(record) == ptr  # the flush does not forget it
    store.writer.begin()
    assert store.writer.flat_pointer(record) is None


def test_decode_ops_returns_plain_data_and_refuses_references_and_garbage():
    ops = [[OP_SET, ["k"], {"a": (1, 2), "s": {3}}]]
    assert decode_ops(codec.encode(ops)) == [[OP_SET, ["k"], {"a": (1, 2), "s": {3}}]]
    with pytest.raises(
        EncodingError, match="^commit refused, nothing was applied: a value in it holds an internal reference"
    ):
        decode_ops(codec.encode([[OP_SET, ["k"], [Ref(8, VALUE)]]]))
    with pytest.raises(EncodingError, match="a dataclass value in it is malformed"):
        decode_ops(codec.encode([[OP_SET, ["k"], msgpack.ExtType(codec.EXT_DATACLASS, msgpack.packb(5))]]))
    with pytest.raises(CorruptionError):
        decode_ops(b"\xc1")
    assert decode_ops(msgpack.packb(7)) == 7  # any shape: parse_ops (commits.py) checks it
