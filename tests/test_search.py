"""Tests of protobase.core.btree.search and its compiled twin cnode.c: point searches in encoded nodes.

The compiled functions must return what the pure-Python ones return (which
decode the node and bisect it with keyorder.py) for every key type a stored
dict may have, mixed in one node; both must match a plain dict model; and
neither may crash on damaged bytes: a malformed node is a CorruptionError.
Trees are written to real segments by an ArenaWriter and walked through an
AtomReader attached read-only, as in a client. Under PROTOBASE_PURE_PYTHON=1
the compiled module is not loaded and the comparisons are skipped; the model
tests still run.
"""

from __future__ import annotations

import datetime as dt
import gc
import random
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protobase import native
from protobase.core import codec
from protobase.core.arena import DICT_BRANCH, DICT_LEAF, SET_BRANCH, SET_LEAF, VALUE, ArenaWriter, AtomReader
from protobase.core.btree import MAX_ENTRIES, MERGE_BELOW, Node, TreeWriter, encode_node, search
from protobase.core.codec import Ref
from protobase.core.store import Store
from protobase.errors import CorruptionError
from protobase.keyorder import bisect_left, bisect_right, order_key
from protobase.shm import instance_entries, new_instance_id, sweep

cnode = native.load("protobase.core.cnode") if search.COMPILED else None
needs_compiled = pytest.mark.skipif(cnode is None, reason="the compiled core is not in use")

_ZONES = st.sampled_from([dt.timezone.utc, dt.timezone(dt.timedelta(hours=2)), dt.timezone(-dt.timedelta(hours=5))])
_scalar_keys = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-300, 300),
    st.floats(allow_nan=False),
    st.decimals(allow_nan=False, allow_infinity=False, places=3),
    st.text(max_size=12),
    st.text(alphabet="ab\u00e9\u4e2d\U0001f600", max_size=4),  # multi-byte UTF-8: byte order is code point order
    st.binary(max_size=8),
    st.datetimes(),
    st.datetimes(timezones=_ZONES),
    st.dates(),
    st.uuids(),
)
keys_strategy = st.recursive(_scalar_keys, lambda inner: st.tuples(inner, inner) | st.tuples(inner), max_leaves=4)


def canonical(keys: list[Any]) -> list[Any]:
    """Distinct keys (as a dict tells them apart: 1 == 1.0 == True) in canonical order."""
    return sorted(dict.fromkeys(keys), key=order_key)


def outcome(call: Any, *args: Any) -> tuple[str, Any]:
    """('ok', result) or ('KeyError', None): what a search gave, comparable across implementations."""
    try:
        result = call(*args)
    except KeyError:
        return "KeyError", None
    return "ok", (type(result), result)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=st.lists(keys_strategy, min_size=0, max_size=MAX_ENTRIES), probes=st.lists(keys_strategy, max_size=8))
def test_leaf_search_matches_a_dict_model_and_the_pure_search(keys: list[Any], probes: list[Any]) -> None:
    keys = canonical(keys)
    values = [Ref(8 * (i + 1), VALUE) if i % 3 else f"v{i}" for i in range(len(keys))]
    model = dict(zip(keys, values))
    payloads = {
        DICT_LEAF: encode_node(Node(DICT_LEAF, keys, values)),
        SET_LEAF: encode_node(Node(SET_LEAF, keys, None)),
    }
    for probe in keys + probes:
        for kind, payload in payloads.items():
            expected = outcome(search.leaf_slot_python, kind, payload, probe)
            if probe in model:
                found = model[probe] if kind == DICT_LEAF else next(key for key in keys if key == probe)
                assert expected == ("ok", (type(found), found))
            else:
                assert expected == ("KeyError", None)
            if cnode is not None:
                assert outcome(cnode.leaf_slot, kind, payload, probe) == expected, (kind, probe)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=st.lists(keys_strategy, min_size=2, max_size=MAX_ENTRIES + 1), probes=st.lists(keys_strategy, max_size=8))
def test_branch_search_picks_the_child_bisect_right_picks(keys: list[Any], probes: list[Any]) -> None:
    separators = canonical(keys)[1:]
    children = [(i + 1) * 1024 for i in range(len(separators) + 1)]
    for kind in (DICT_BRANCH, SET_BRANCH):
        payload = encode_node(Node(kind, separators, children, [1] * len(children)))
        for probe in separators + keys + probes:
            expected = children[bisect_right(separators, probe)]
            assert search.branch_child_python(kind, payload, probe) == expected
            if cnode is not None:
                assert cnode.branch_child(kind, payload, probe) == expected, probe


class Trees:
    """An arena to write trees into, and a Store reading them back read-only (as a client does)."""

    def __init__(self, arena: ArenaWriter, reader: AtomReader) -> None:
        self.arena = arena
        self.reader = reader
        self.store = Store(reader, object_cache=4096, bytes_cache=64)
        self.writer = TreeWriter(self.store.node)

    def tree(self, leaf_kind: int, keys: list[Any], values: list[Any] | None) -> int:
        root = self.writer.build(leaf_kind, keys, values)
        return self.writer.flush(root, lambda node: self.arena.append(node.kind, encode_node(node)), lambda v: v)

    def searchers(self) -> list[Any]:
        """The pure searcher, and the compiled one when it is in use: each must give the same answers."""
        made = [search.SearcherPython(self.reader.buffers, self.reader.atom, self.store.access.lookup)]
        if cnode is not None:
            made.append(cnode.Searcher(self.reader.buffers, self.reader.atom, self.store.access.lookup))
        return made


@pytest.fixture
def trees() -> Iterator[Trees]:
    instance = new_instance_id()
    arena = ArenaWriter(instance)
    reader = AtomReader(instance)  # no writer: data segments are attached read-only
    try:
        yield Trees(arena, reader)
    finally:
        reader.close()
        arena.close(unlink=True)
        assert sweep(instance) == [], "the arena left segments behind"
        assert instance_entries(instance) == []


def mixed_keys(count: int, seed: int) -> list[Any]:
    rng = random.Random(seed)
    makers = [
        lambda i: i * 7 - count,
        lambda i: f"user{i:06d}",
        lambda i: f"\u00e9t\u00e9{i}",
        lambda i: str(i).encode(),
        lambda i: i / 4 + 0.5,
        lambda i: (i % 5, f"k{i}"),
        lambda i: dt.date(2000, 1, 1) + dt.timedelta(days=i),
        lambda i: dt.datetime(2020, 1, 1) + dt.timedelta(minutes=i),
        lambda i: dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(minutes=i),
        lambda i: uuid.UUID(int=i * 977),
        lambda i: Decimal(i) / 3,
        lambda i: 2**65 + i,
    ]
    return canonical([rng.choice(makers)(i) for i in range(count)] + [None, True])


@pytest.mark.parametrize("leaf_kind", [DICT_LEAF, SET_LEAF])
def test_a_walk_from_the_root_finds_every_key_of_a_mixed_tree_as_the_decoded_walk_does(
    trees: Trees, leaf_kind: int
) -> None:
    keys = mixed_keys(5_000, seed=leaf_kind)
    values = [Ref(trees.arena.append(VALUE, codec.encode({"n": i})), VALUE) for i in range(len(keys))]
    root = trees.tree(leaf_kind, keys, values if leaf_kind == DICT_LEAF else None)
    absent = [-(10**30), "zzz", "user", b"", (9, "z"), dt.date(1900, 1, 1), 1.25e300, uuid.UUID(int=1)]
    for searcher in trees.searchers():
        for key in keys + absent:
            expected = outcome(trees.store.access.lookup, root, key, leaf_kind)
            assert outcome(searcher.lookup, root, key, leaf_kind) == expected, (type(searcher), key)
        assert outcome(searcher.lookup, 0, "any", leaf_kind) == ("KeyError", None)  # the empty tree


def test_a_key_of_no_key_type_goes_to_the_fallback(trees: Trees) -> None:
    class Name(str):
        pass

    root = trees.tree(DICT_LEAF, ["a", "b"], [1, 2])
    for searcher in trees.searchers():
        assert searcher.lookup(root, Name("b"), DICT_LEAF) == 2  # as the decoded walk finds it
        with pytest.raises(KeyError):
            searcher.lookup(root, Name("c"), DICT_LEAF)


def test_value_decodes_a_record_frozen_with_its_payload_length(trees: Trees) -> None:
    record = {"id": 1, "tags": ["a", "b"], "at": dt.date(2020, 1, 2)}
    ptr = trees.arena.append(VALUE, codec.encode(record))
    for searcher in trees.searchers():
        value, length = searcher.value(ptr, None)
        assert value == record and type(value).__name__ == "FrozenDict"
        assert length == len(codec.encode(record))


@needs_compiled
def test_a_decoded_record_is_not_left_for_the_cyclic_collector(trees: Trees) -> None:
    """Regression: FrozenDicts (dict subclasses) stayed tracked, so a reader's collections visited
    every cached record; with 10,000 cached, the collector took more time than the reads."""
    flat = trees.arena.append(VALUE, codec.encode({"id": 1, "tags": ["a", (1, "b")], "name": "x"}))
    holding = trees.arena.append(VALUE, codec.encode({"tree": Ref(flat, VALUE), "tags": ["a"]}))
    searcher = trees.searchers()[-1]
    value, _ = searcher.value(flat, None)
    assert not gc.is_tracked(value) and not gc.is_tracked(value["tags"])
    value, _ = searcher.value(holding, lambda ptr, kind: ["a container the ref hook made"])
    assert gc.is_tracked(value)  # it holds a tracked container: it could be in a cycle
    assert not gc.is_tracked(value["tags"])


def atom(kind: int, payload: bytes) -> bytes:
    """An atom as arena.py lays it out: u32 kind << 28 | length, the payload, padding to 4 bytes."""
    raw = (kind << 28 | len(payload)).to_bytes(4, "little") + payload
    return raw + b"\0" * (-len(raw) % 4)


def segment_of(*atoms: bytes) -> tuple[dict[int, memoryview], list[int]]:
    """Buffers {1 -> the atoms laid out one after the other} and each atom's pointer."""
    pointers, offset = [], 0
    for raw in atoms:
        pointers.append(1 << 40 | offset)
        offset += len(raw)
    return {1: memoryview(b"".join(atoms))}, pointers


def unmapped(ptr: int) -> tuple[int, memoryview]:
    raise CorruptionError(f"segment of {ptr:#x} is not mapped")


def searchers_over(buffers: dict[int, memoryview]) -> list[Any]:
    def fallback(root: int, key: Any, leaf_kind: int) -> Any:
        raise AssertionError("no fallback for a str key")

    def atom_python(ptr: int) -> tuple[int, memoryview]:
        """AtomReader.atom over `buffers` (the pure searcher reads through it)."""
        buf = buffers.get(ptr >> 40)
        if buf is None:
            return unmapped(ptr)
        offset = ptr & ((1 << 40) - 1)
        if offset + 4 > len(buf):
            raise CorruptionError("past the end")
        word = int.from_bytes(buf[offset : offset + 4], "little")
        if offset + 4 + (word & ((1 << 28) - 1)) > len(buf) or not 1 <= word >> 28 <= 8:
            raise CorruptionError("bad header")
        return word >> 28, buf[offset + 4 : offset + 4 + (word & ((1 << 28) - 1))]

    made: list[Any] = [search.SearcherPython(buffers, atom_python, fallback)]
    if cnode is not None:
        made.append(cnode.Searcher(buffers, unmapped, fallback))
    return made


def test_a_branch_that_leads_back_to_itself_is_a_corruption_not_an_endless_walk() -> None:
    first = 1 << 40  # the pointer of the first atom of segment 1: the branch's children point at it
    buffers, (ptr,) = segment_of(atom(DICT_BRANCH, encode_node(Node(DICT_BRANCH, ["m"], [first, first], [1, 1]))))
    assert ptr == first
    for searcher in searchers_over(buffers):
        with pytest.raises(CorruptionError, match="deeper than any tree can be"):
            searcher.lookup(ptr, "a", DICT_LEAF)


def test_a_node_of_another_tree_kind_is_a_corruption() -> None:
    buffers, (leaf,) = segment_of(atom(SET_LEAF, encode_node(Node(SET_LEAF, ["a"], None))))
    for searcher in searchers_over(buffers):
        with pytest.raises(CorruptionError):
            searcher.lookup(leaf, "a", DICT_LEAF)


def test_a_pointer_past_its_segment_or_a_bad_header_is_a_corruption() -> None:
    good = atom(DICT_LEAF, encode_node(Node(DICT_LEAF, ["a"], [1])))
    buffers, (ptr, _) = segment_of(good, b"\xff\xff\xff\xff")
    for searcher in searchers_over(buffers):
        assert searcher.lookup(ptr, "a", DICT_LEAF) == 1
        for bad in (ptr + len(good), ptr + 4096, ptr + len(good) + 4):  # a bad header, then past the end
            with pytest.raises(CorruptionError):
                searcher.lookup(bad, "a", DICT_LEAF)


def _damaged(payload: bytes, rng: random.Random) -> bytes:
    damaged = bytearray(payload)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.4 and damaged:
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        elif choice < 0.7:
            del damaged[rng.randrange(len(damaged) + 1) :]
        else:
            at = rng.randrange(len(damaged) + 1)
            damaged[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
    return bytes(damaged)


def test_damaged_nodes_give_corruption_errors_never_a_crash() -> None:
    """Random byte flips, truncations and insertions in leaves and branches of every key type."""
    rng = random.Random(12)
    keys = mixed_keys(60, seed=3)[:MAX_ENTRIES]
    nodes = [
        (DICT_LEAF, encode_node(Node(DICT_LEAF, keys, [Ref(8 * i + 8, VALUE) for i in range(len(keys))]))),
        (SET_LEAF, encode_node(Node(SET_LEAF, keys, None))),
        (DICT_BRANCH, encode_node(Node(DICT_BRANCH, keys[1:], [8 * i + 8 for i in range(len(keys))], [1] * len(keys)))),
    ]
    functions = [(search.leaf_slot_python, search.branch_child_python)]
    if cnode is not None:
        functions.append((cnode.leaf_slot, cnode.branch_child))
    outcomes = set()
    for _ in range(3_000):
        kind, payload = rng.choice(nodes)
        damaged = _damaged(payload, rng)
        probe = rng.choice(keys)
        for leaf_slot, branch_child in functions:
            try:
                (branch_child if kind == DICT_BRANCH else leaf_slot)(kind, damaged, probe)
                outcomes.add("answered")  # damage the search did not need to read, or a plausible node
            except CorruptionError:
                outcomes.add("corrupt")
            except KeyError:
                outcomes.add("absent")
    assert "corrupt" in outcomes  # the damage was seen, as an error, every time it mattered


@needs_compiled
def test_damaged_records_give_corruption_errors(trees: Trees) -> None:
    rng = random.Random(5)
    payload = codec.encode({"id": 1, "name": "n", "tags": ["a", (1, 2)], "when": dt.date(2020, 1, 1)})
    searcher = trees.searchers()[-1]
    for _ in range(500):
        ptr = trees.arena.append(VALUE, _damaged(payload, rng))
        try:
            searcher.value(ptr, None)
        except CorruptionError:
            pass


def test_a_store_read_caches_the_record_and_no_node(trees: Trees) -> None:
    keys = [f"user{i:05d}" for i in range(3_000)]
    records = [{"id": i, "name": f"n{i}"} for i in range(3_000)]
    root = trees.tree(DICT_LEAF, keys, [Ref(trees.arena.append(VALUE, codec.encode(r)), VALUE) for r in records])
    store = trees.store
    for i in random.Random(1).sample(range(3_000), 300):
        assert store.get(root, keys[i]) == records[i]
    cached = list(store.objects.data.values())
    if search.COMPILED:
        assert len(cached) == 300 and not any(type(value) is Node for value in cached)
    else:  # the pure walk caches the decoded nodes it passes
        assert any(type(value) is Node for value in cached)
    assert store.objects.held_bytes == sum(store.objects.charges.values())
    with pytest.raises(KeyError):
        store.get(root, "nobody")


def test_a_clients_object_cache_is_bounded_by_bytes_and_the_coordinators_is_not(trees: Trees) -> None:
    from protobase.core.store import DEFAULT_OBJECT_BYTES

    assert trees.store.objects.max_bytes == DEFAULT_OBJECT_BYTES  # a reader without a writer: a client
    assert Store(AtomReader(trees.reader.instance_id, writer=trees.arena)).objects.max_bytes is None
    keys = [f"k{i:05d}" for i in range(2_000)]
    root = trees.tree(
        DICT_LEAF, keys, [Ref(trees.arena.append(VALUE, codec.encode({"n": i})), VALUE) for i in range(2_000)]
    )
    small = Store(trees.reader, object_bytes=50_000)
    for key in keys:
        small.get(root, key)
        assert small.objects.held_bytes <= 50_000
    assert 0 < len(small.objects.data) < 2_000
    assert all(small.get(root, key) == {"n": i} for i, key in enumerate(keys))  # evicted ones decode again


def test_damaged_nodes_walked_again_through_their_index_give_corruption_errors_too() -> None:
    """The compiled walk indexes a node it walks through a second time: damage must be seen then too."""
    rng = random.Random(21)
    keys = [f"k{i:03d}" for i in range(MAX_ENTRIES)]
    leaf = atom(DICT_LEAF, encode_node(Node(DICT_LEAF, keys, [Ref(8 * i + 8, VALUE) for i in range(MAX_ENTRIES)])))
    outcomes = set()
    for _ in range(400):
        damaged = bytearray(leaf)
        for _ in range(rng.randint(1, 3)):
            damaged[rng.randrange(4, len(damaged))] = rng.randrange(256)  # the header stays whole
        buffers, (ptr,) = segment_of(bytes(damaged))
        for searcher in searchers_over(buffers):
            for probe in rng.sample(keys, 3) * 2:  # each probe twice: the second walk reads the index
                try:
                    searcher.lookup(ptr, probe, DICT_LEAF)
                    outcomes.add("answered")
                except CorruptionError:
                    outcomes.add("corrupt")
                except KeyError:
                    outcomes.add("absent")
    assert "corrupt" in outcomes


def test_a_walk_through_indexed_nodes_finds_what_the_first_walk_found(trees: Trees) -> None:
    keys = mixed_keys(3_000, seed=9)
    root = trees.tree(DICT_LEAF, keys, list(range(len(keys))))
    searcher = trees.searchers()[-1]
    first = [outcome(searcher.lookup, root, key, DICT_LEAF) for key in keys]
    for _ in range(2):  # every node now walked through more than once: indexed
        assert [outcome(searcher.lookup, root, key, DICT_LEAF) for key in keys] == first
    assert first == [("ok", (int, i)) for i in range(len(keys))]


# ---- splice: a point write on encoded nodes -------------------------------------------------


class Appended:
    """An `append(kind, payload)` that keeps what it is given and hands out pointers of every width."""

    POINTERS = [5, 200, 40_000, 3_000_000_000, 1 << 40 | 8, 7 << 40 | 123_456]

    def __init__(self) -> None:
        self.atoms: list[tuple[int, bytes]] = []

    def __call__(self, kind: int, payload: bytes) -> int:
        self.atoms.append((kind, bytes(payload)))
        return self.POINTERS[(len(self.atoms) - 1) % len(self.POINTERS)]


ABSENT = object()  # the old slot splice reports for a new key


def record(trees: Trees, n: int) -> Ref:
    return Ref(trees.arena.append(VALUE, codec.encode({"n": n})), VALUE)


def grown_tree(trees: Trees, keys: list[Any], values: list[Any], seed: int) -> int:
    """A dict tree grown key by key in random order, as commits grow one: leaves of every width."""
    root: Any = 0
    order = list(range(len(keys)))
    random.Random(seed).shuffle(order)
    for i in order:
        root = trees.writer.assign(root, keys[i], values[i])[0]
    return trees.writer.flush(root, lambda node: trees.arena.append(node.kind, encode_node(node)), lambda v: v)


def nested_trees(trees: Trees) -> tuple[int, dict[Any, list[Any]]]:
    """An outer dict tree of mixed keys whose values are records, scalars and Refs to inner dict trees (some
    built full)."""
    inner_keys: dict[Any, list[Any]] = {}
    outer = mixed_keys(300, seed=7)
    values: list[Any] = []
    for i, key in enumerate(outer):
        if i % 3 == 0:
            keys = mixed_keys(700 if i % 2 else 40, seed=i)
            records = [record(trees, j) if j % 2 else j for j in range(len(keys))]
            # most grown key by key; some built full, as a bulk load builds them (a new key splits a leaf)
            ptr = trees.tree(DICT_LEAF, keys, records) if i % 9 == 0 else grown_tree(trees, keys, records, seed=i)
            values.append(Ref(ptr, trees.reader.atom(ptr)[0]))
            inner_keys[key] = keys
        else:
            values.append(Ref(trees.arena.append(VALUE, codec.encode({"k": i})), VALUE) if i % 3 == 1 else f"s{i}")
    return grown_tree(trees, outer, values, seed=1), inner_keys


def expected_payload(trees: Trees, ptr: int, key: Any, entry: Any, new_key: bool) -> bytes:
    """A node's payload with the entry under `key` (a leaf's value, a branch's child) set to `entry`;
    for a `new_key`, the key added, with its subtree's size."""
    kind, payload = trees.reader.atom(ptr)
    node = search.decode_node(kind, payload, ptr)
    assert node.keys is not None and node.values is not None
    if kind == DICT_BRANCH:
        position = bisect_right(node.keys, key)
        node.values[position] = entry
        if new_key:
            assert node.sizes is not None
            node.sizes[position] += 1
    elif new_key:
        position = bisect_left(node.keys, key)
        node.keys.insert(position, key)
        node.values.insert(position, entry)
    else:
        node.values[node.keys.index(key)] = entry
    return encode_node(node)


def test_splice_writes_what_copying_changing_and_encoding_the_nodes_writes(trees: Trees) -> None:
    root, inner_keys = nested_trees(trees)
    rng = random.Random(3)
    paths = [(outer, rng.choice(keys)) for outer, keys in inner_keys.items()]
    paths += [(outer,) for outer in rng.sample(list(inner_keys), 5)]
    new_keys = [key for key in mixed_keys(400, seed=99) if all(key not in keys for keys in inner_keys.values())]
    paths += [(outer, rng.choice(new_keys)) for outer in inner_keys]
    value = Ref(77 << 40 | 64, VALUE)
    depths, inserted, splits = set(), 0, 0
    for path in paths:
        results = []
        for searcher in trees.searchers():
            appended = Appended()
            spliced = searcher.splice(root, path, lambda old: codec.pack(value), appended, codec.pack, ABSENT)
            results.append((spliced, appended.atoms))
        assert all(result == results[0] for result in results[1:]), path  # the twins agree on everything
        if results[0][0] is None:  # a new key in a full leaf at its tree's root: path copying grows the tree
            assert path[-1] in new_keys and len(path) == 2
            continue
        (new_root, old, retired), atoms = results[0]
        # The nodes on the way, root first, each with the key that leads through it.
        on_path = [(ptr, path[0], len(path) == 1) for ptr in nodes_on_the_way(trees, root, path[0])]
        if len(path) == 2:
            inner = trees.store.access.lookup(root, path[0])
            on_path += [(ptr, path[1], True) for ptr in nodes_on_the_way(trees, inner.ptr, path[1])]
        assert [ptr for ptr, _, _ in on_path] == [ptr for ptr, _ in retired]
        assert [length for _, length in retired] == [len(trees.reader.atom(ptr)[1]) for ptr, _, _ in on_path]
        new_key = path[-1] in new_keys
        inserted += new_key
        assert old is ABSENT if new_key else old == trees.store.access.lookup(on_path[-1][0], path[-1])
        # Bottom-up: each atom is its node with one entry set, to the value or the new node below; a full
        # leaf that takes a new key is written as its two halves, and its parent takes both.
        split = len(atoms) == len(on_path) + 1
        splits += split
        entry: Any = value
        written_at = 0  # atoms written so far
        halves: tuple[int, int, Any] | None = None
        for position in range(len(on_path) - 1, -1, -1):
            ptr, key, last_tree = on_path[position]
            if split and position == len(on_path) - 1:
                left, right, separator = split_leaf_payloads(trees, ptr, key, value)
                assert atoms[:2] == [(DICT_LEAF, left), (DICT_LEAF, right)], path
                halves, written_at = (Appended.POINTERS[0], Appended.POINTERS[1], separator), 2
                continue
            kind, payload = atoms[written_at]
            assert kind == trees.reader.atom(ptr)[0]
            if halves is not None and position == len(on_path) - 2:
                assert payload == split_parent_payload(trees, ptr, key, halves), (path, ptr)
            else:
                assert payload == expected_payload(trees, ptr, key, entry, new_key and last_tree), (path, ptr)
            written = Appended.POINTERS[written_at % len(Appended.POINTERS)]
            written_at += 1
            if position > 0:  # the parent holds a pointer (a branch) or a Ref to the tree (a leaf)
                entry = written if trees.reader.atom(on_path[position - 1][0])[0] == DICT_BRANCH else Ref(written, kind)
        assert new_root == written and written_at == len(atoms)
        depths.add(len(on_path))
    assert max(depths) >= 4 and inserted >= 20  # branches and leaves of both trees, and inserts, were written
    assert splits >= 3


def split_leaf_payloads(trees: Trees, ptr: int, key: Any, value: Any) -> tuple[bytes, bytes, Any]:
    """A full dict leaf with `key` inserted, as TreeWriter._split_child leaves it: its halves' payloads and
    the separator."""
    node = search.decode_node(*trees.reader.atom(ptr), ptr)
    assert node.keys is not None and node.values is not None
    position = bisect_left(node.keys, key)
    node.keys.insert(position, key)
    node.values.insert(position, value)
    half = len(node.keys) // 2
    left, right = (Node(DICT_LEAF, node.keys[a:b], node.values[a:b]) for a, b in ((0, half), (half, None)))
    return encode_node(left), encode_node(right), node.keys[half]


def split_parent_payload(trees: Trees, ptr: int, key: Any, halves: tuple[int, int, Any]) -> bytes:
    """A dict branch whose child under `key` split into `halves` (left, right, separator)."""
    node = search.decode_node(*trees.reader.atom(ptr), ptr)
    assert node.keys is not None and node.values is not None and node.sizes is not None
    position = bisect_right(node.keys, key)
    left, right, separator = halves
    node.values[position : position + 1] = [left, right]
    node.sizes[position : position + 1] = [MAX_ENTRIES // 2, MAX_ENTRIES // 2 + 1]
    node.keys.insert(position, separator)
    return encode_node(node)


def nodes_on_the_way(trees: Trees, root: int, key: Any) -> Iterator[int]:
    """The pointers of a tree's nodes from its root to the leaf that holds `key`."""
    ptr = root
    while True:
        yield ptr
        kind, payload = trees.reader.atom(ptr)
        if kind == DICT_LEAF:
            return
        ptr = search.branch_child_python(kind, payload, key)


def test_splice_declines_what_it_cannot_write_in_place_and_writes_nothing(trees: Trees) -> None:
    class Name(str):
        pass

    root, inner_keys = nested_trees(trees)
    outer = list(inner_keys)[0]
    scalar = next(k for k in mixed_keys(300, seed=7) if k not in inner_keys)
    full_root = trees.tree(DICT_LEAF, [f"k{i:04d}" for i in range(0, 128, 2)], list(range(64)))  # one full leaf
    widest_keys = [f"k{i:05d}" for i in range(0, 2 * MAX_ENTRIES**2, 2)]
    widest = trees.tree(DICT_LEAF, widest_keys, list(range(len(widest_keys))))  # 64 full leaves under one branch
    flat = trees.arena.append(VALUE, codec.encode({"a": 1}))
    sets = trees.tree(SET_LEAF, ["x", "y"], None)
    holder = trees.tree(DICT_LEAF, ["flat", "set"], [Ref(flat, VALUE), Ref(sets, SET_LEAF)])
    declined = [
        (full_root, ("k0101",)),  # a new key in a full leaf at the root: path copying grows the tree
        (widest, ("k00101",)),  # its leaf would split, and its branch with it
        (root, ("no such tree", "x")),
        (root, (scalar, "x")),  # no container below
        (holder, ("flat", "a")),  # a flat dict: one VALUE atom, rewritten whole
        (holder, ("set", "x")),  # not a dict tree
        (root, (Name(outer), "x")),  # not of an exact key type
        (0, ("a",)),
        (root, ()),
    ]
    for searcher in trees.searchers():
        for tree, path in declined:
            appended = Appended()
            refused = searcher.splice(tree, path, lambda old: pytest.fail("asked"), appended, codec.pack, ABSENT)
            assert refused is None and appended.atoms == [], path


def test_splice_on_a_cycle_is_a_corruption_and_writes_nothing() -> None:
    first = 1 << 40
    buffers, (ptr,) = segment_of(atom(DICT_BRANCH, encode_node(Node(DICT_BRANCH, ["m"], [first, first], [1, 1]))))
    for searcher in searchers_over(buffers):
        appended = Appended()
        with pytest.raises(CorruptionError, match="deeper than any tree can be"):
            searcher.splice(ptr, ("a",), lambda old: b"\x01", appended, codec.pack, ABSENT)
        assert appended.atoms == []


# ---- splice_set: an index's entries removed and added in its set tree's bytes ---------------------


def path_copied(
    trees: Trees, root: int, keys: list[Any], adding: list[bool]
) -> tuple[list[tuple[int, bytes]], list[int]]:
    """What TreeWriter writes removing, then adding, `keys` of the set tree at `root` (through Appended), and
    the pointers of the nodes it copies."""
    discarded: list[int] = []
    writer = TreeWriter(trees.store.node, on_discard=discarded.append)
    tree: Any = root
    for key in [key for key, add in zip(keys, adding) if not add]:
        tree = writer.remove(tree, key, SET_LEAF)[0]
    for key in [key for key, add in zip(keys, adding) if add]:
        tree = writer.assign(tree, key, None, SET_LEAF)[0]
    appended = Appended()
    writer.flush(tree, lambda node: appended(node.kind, encode_node(node)), lambda v: v)
    return appended.atoms, discarded


def index_tree(trees: Trees, entries: list[Any], seed: int) -> int:
    """A set tree of index entries grown entry by entry in random order: leaves of every width."""
    root: Any = 0
    order = entries[:]
    random.Random(seed).shuffle(order)
    for entry in order:
        root = trees.writer.assign(root, entry, None, SET_LEAF)[0]
    return trees.writer.flush(root, lambda node: trees.arena.append(node.kind, encode_node(node)), lambda v: v)


def test_splice_set_writes_what_removing_and_adding_by_path_copying_writes(trees: Trees) -> None:
    # Index entries (kind, value, key) of mixed values: tuple keys compared in the nodes' bytes.
    values = mixed_keys(60, seed=5)
    entries = canonical([(i % 2, values[i % len(values)], f"r{i:05d}") for i in range(12000)])
    present, absent = entries[::2], entries[1::2]
    roots = {"grown": index_tree(trees, present, seed=2), "small": index_tree(trees, present[:40], seed=3)}
    roots["full"] = trees.tree(SET_LEAF, present, None)  # built full: an insert splits a leaf
    rng = random.Random(8)
    outcomes: dict[str, int] = {"written": 0, "declined": 0, "several in a leaf": 0, "split": 0, "deepest": 0}
    for _ in range(400):
        name = rng.choice(list(roots))
        pool = present if name != "small" else present[:40]
        removed = rng.sample(pool, rng.choice([0, 1, 1, 2, 3]))
        added = rng.sample(absent, rng.choice([0, 1, 1, 2]) or int(not removed))
        if rng.random() < 0.2 and removed:  # next to a removed entry: the same leaf
            added.append(absent[bisect_left(absent, removed[0]) % len(absent)])
        keys = canonical(removed + added)
        adding = [key in added for key in keys]
        results = []
        for searcher in trees.searchers():
            appended = Appended()
            dry = searcher.splice_set(roots[name], keys, adding, None, codec.pack)
            results.append((dry, searcher.splice_set(roots[name], keys, adding, appended, codec.pack), appended.atoms))
        assert all(result == results[0] for result in results[1:]), (name, keys)  # the twins agree
        dry, spliced, atoms = results[0]
        if spliced is None:
            assert dry is None and atoms == []  # declined: nothing written
            outcomes["declined"] += 1
            continue
        copied_atoms, discarded = path_copied(trees, roots[name], keys, adding)
        assert atoms == copied_atoms, (name, keys)  # byte for byte, in the order a flush writes
        new_root, retired = spliced
        assert dry == (0, retired) and new_root == Appended.POINTERS[(len(atoms) - 1) % len(Appended.POINTERS)]
        assert sorted(retired) == sorted((ptr, len(trees.reader.atom(ptr)[1])) for ptr in discarded)
        outcomes["written"] += 1
        outcomes["several in a leaf"] += sum(kind == SET_LEAF for kind, _ in atoms) < len(keys)
        outcomes["split"] += len(atoms) > len(retired)  # a leaf written as two
        outcomes["deepest"] = max(outcomes["deepest"], len(atoms) if len(keys) == 1 else 0)
    assert outcomes["written"] > 200 and outcomes["declined"] > 20 and outcomes["several in a leaf"] > 10, outcomes
    assert outcomes["split"] > 20, outcomes
    assert outcomes["deepest"] >= 3, outcomes  # a root, a branch and a leaf


def test_a_splice_set_after_dry_runs_writes_what_one_without_them_writes(trees: Trees) -> None:
    """The compiled twin keeps a dry run's plan for the write that follows it: a write of other keys
    (the same list changed since), or after more dry runs than it keeps, writes what a fresh one does."""
    entries = [(0, i, f"r{i:05d}") for i in range(0, 8000, 2)]
    roots = [trees.tree(SET_LEAF, entries[n * 500 : n * 500 + 900], None) for n in range(6)]  # six indexes

    def written(searcher: Any, root: int, keys: list[Any], adding: list[bool]) -> tuple[Any, list[Any]]:
        appended = Appended()
        return searcher.splice_set(root, keys, adding, appended, codec.pack), appended.atoms

    oracle = trees.searchers()[0]
    for searcher in trees.searchers():
        keys = [entries[n * 500 + 3] for n in range(6)]
        expected = [written(oracle, root, [key], [False]) for root, key in zip(roots, keys)]
        for root, key in zip(roots, keys):  # more dry runs than the twin keeps: the first ones are forgotten
            assert searcher.splice_set(root, [key], [False], None, codec.pack) is not None
        assert [written(searcher, root, [key], [False]) for root, key in zip(roots, keys)] == expected
        changing = [keys[0]]
        assert searcher.splice_set(roots[0], changing, [False], None, codec.pack) is not None
        changing[0] = (0, 1, "r00001")  # the list the dry run planned now names a key to add
        assert written(searcher, roots[0], changing, [True]) == written(oracle, roots[0], changing, [True])
        assert searcher.splice_set(roots[0], [keys[0]], [False], None, codec.pack) is not None
        assert written(searcher, roots[0], [keys[0]], [True]) == (None, [])  # the flags changed: there already


def test_splice_set_declines_what_path_copying_would_restructure_and_refuses_keys_out_of_order(trees: Trees) -> None:
    entries = [(0, i, f"r{i:05d}") for i in range(0, 2 * MAX_ENTRIES**2, 2)]
    widest = trees.tree(SET_LEAF, entries, None)  # 64 full leaves under one branch: a split would split it
    full = trees.tree(SET_LEAF, entries[:2000], None)  # full leaves under a branch with room
    leaf = trees.tree(SET_LEAF, entries[:20], None)  # the root is a leaf
    root_leaf = trees.tree(SET_LEAF, entries[:MAX_ENTRIES], None)  # a full one: a split grows the tree
    declined = [
        (widest, [(0, 1, "r00001")], [True]),
        (full, [(0, 1, "r00001"), (0, 3, "r00003")], [True, True]),  # two splits of one leaf
        (root_leaf, [(0, 1, "r00001")], [True]),
        (full, [entries[5]], [True]),  # already there: path copying changes nothing
        (full, [(0, 3, "x")], [False]),  # not there: path copying raises
        (leaf, entries[:20], [False] * 20),  # the root leaf would empty
        (0, [entries[0]], [False]),  # the empty tree
        (full, [], []),
    ]
    # a leaf at MERGE_BELOW: one more remove would merge it
    shrunk = trees.tree(SET_LEAF, entries, None)
    for key in entries[64 : 64 + 64 - MERGE_BELOW]:
        shrunk = trees.writer.remove(shrunk, key, SET_LEAF)[0]
    shrunk = trees.writer.flush(shrunk, lambda node: trees.arena.append(node.kind, encode_node(node)), lambda v: v)
    declined.append((shrunk, [entries[64 + 64 - MERGE_BELOW]], [False]))
    for searcher in trees.searchers():
        for root, keys, adding in declined:
            appended = Appended()
            assert searcher.splice_set(root, keys, adding, appended, codec.pack) is None, keys
            assert appended.atoms == []
        assert searcher.splice_set(shrunk, [entries[0]], [False], None, codec.pack) is not None  # another leaf
        assert searcher.splice_set(full, [(0, 1, "r00001")], [True], None, codec.pack) is not None  # one split
        with pytest.raises(ValueError, match="distinct and in canonical order"):
            searcher.splice_set(full, [entries[9], entries[3]], [False, False], Appended(), codec.pack)
        with pytest.raises(ValueError, match="distinct and in canonical order"):
            searcher.splice_set(full, [entries[3], entries[3]], [False, False], Appended(), codec.pack)


def test_splice_set_on_damaged_nodes_gives_corruption_errors_never_a_crash() -> None:
    """A set tree of tuple entries (a branch over two leaves) with bytes flipped, cut or inserted in one node:
    splice_set answers, declines or says CorruptionError, walked once and again (through the node indexes)."""
    rng = random.Random(17)
    entries = [(0, f"c{i % 7}", f"u{i:03d}") for i in range(100)]
    entries.sort(key=order_key)
    left, right = entries[:50], entries[50:]
    leaves = [atom(SET_LEAF, encode_node(Node(SET_LEAF, half, None))) for half in (left, right)]
    pointers = [1 << 40, 1 << 40 | len(leaves[0])]
    branch = atom(SET_BRANCH, encode_node(Node(SET_BRANCH, [right[0]], pointers, [50, 50])))
    outcomes = set()
    for _ in range(600):
        atoms = [*leaves, branch]
        which = rng.randrange(3)
        raw = bytearray(atoms[which])
        damaged = _damaged(bytes(raw[4:]), rng)[: len(raw) - 4]  # the header stays whole and true
        atoms[which] = raw[:4] + damaged + bytes(len(raw) - 4 - len(damaged))
        buffers, ptrs = segment_of(*atoms)
        keys = sorted({rng.choice(entries), (0, "c9", f"u{rng.randrange(100):03d}")}, key=order_key)
        adding = [key not in entries for key in keys]
        for searcher in searchers_over(buffers):
            for _ in range(2):
                try:
                    searcher.splice_set(ptrs[2], keys, adding, Appended(), codec.pack)
                    outcomes.add("answered")
                except CorruptionError:
                    outcomes.add("corrupt")
                except ValueError:
                    outcomes.add("out of order")  # damaged keys read as out of order
    assert "corrupt" in outcomes and "answered" in outcomes, outcomes
