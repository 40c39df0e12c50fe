"""Persistent B+trees (core/btree/) against dict / set / list models, over an in-memory atom store.

The store maps a fake AtomPointer to (kind, payload) exactly as encode_node
wrote it; loading decodes through decode_node and caches the clean Node, as
the real Store does, so a tree algorithm that mutated a clean node in place
would corrupt older versions, which the tests keep and re-check.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from protobase.core.arena import DICT_BRANCH, DICT_LEAF, LIST_BRANCH, LIST_LEAF, SET_LEAF
from protobase.core.btree import MAX_ENTRIES, Node, TreeAccess, TreeWriter, decode_node, encode_node
from protobase.core.codec import Ref
from protobase.errors import CorruptionError
from protobase.keyorder import order_key


class MemoryAtoms:
    """A dict of atoms standing in for the shared-memory arena."""

    def __init__(self) -> None:
        self.atoms: dict[int, tuple[int, bytes]] = {}  # {ptr -> (kind, payload)}
        self.cache: dict[int, Node] = {}  # {ptr -> decoded clean node}
        self.next_ptr = 8
        self.access = TreeWriter(self.load)

    def load(self, ptr: int) -> Node:
        node = self.cache.get(ptr)
        if node is None:
            kind, payload = self.atoms[ptr]
            node = self.cache[ptr] = decode_node(kind, payload, ptr)
        return node

    def write_node(self, node: Node) -> int:
        ptr = self.next_ptr
        self.next_ptr += 8
        self.atoms[ptr] = (node.kind, encode_node(node))
        return ptr

    def flush(self, root: Node | int) -> int:
        return self.access.flush(root, self.write_node, lambda value: value)

    def fresh(self) -> TreeAccess:
        """A TreeAccess that decodes every node anew (no shared cache)."""
        return TreeAccess(lambda ptr: decode_node(*self.atoms[ptr], ptr))

    def rewrite(self, ptr: int, node: Node) -> None:
        """Overwrite the atom at `ptr` (to corrupt it on purpose) and drop it from the cache."""
        self.atoms[ptr] = (node.kind, encode_node(node))
        self.cache.pop(ptr, None)


def ordered(keys) -> list:
    return sorted(keys, key=order_key)


def no_values(value) -> None:
    pass


_keys = st.integers(-50, 400) | st.text(alphabet="abcd", max_size=3) | st.tuples(st.integers(0, 3), st.booleans())
_values = st.integers() | st.text(max_size=4) | st.none() | st.lists(st.integers(), max_size=2)


class TreeMachine(RuleBasedStateMachine):
    """Dict, set and list trees driven side by side with their plain models."""

    @initialize()
    def setup(self):
        self.mem = MemoryAtoms()
        self.t = self.mem.access
        self.dict_root: Node | int = 0
        self.set_root: Node | int = 0
        self.list_root: Node | int = 0
        self.dict_model: dict = {}
        self.set_model: set = set()
        self.list_model: list = []
        self.versions: list = []  # [(leaf kind, root ptr, model copy)] of flushed roots

    # -- dict tree -------------------------------------------------------------------

    @rule(pairs=st.lists(st.tuples(_keys, _values), max_size=120))
    def assign_many(self, pairs):
        for key, value in pairs:
            self.dict_root, added = self.t.assign(self.dict_root, key, value)
            assert added == (key not in self.dict_model)
            self.dict_model[key] = value

    @precondition(lambda self: self.dict_model)
    @rule(data=st.data())
    def remove_some(self, data):
        keys = data.draw(
            st.lists(st.sampled_from(sorted(self.dict_model, key=order_key)), max_size=80, unique_by=order_key)
        )
        for key in keys:
            self.dict_root, removed = self.t.remove(self.dict_root, key)
            assert removed == self.dict_model.pop(key)

    @rule(key=_keys)
    def remove_missing(self, key):
        if key in self.dict_model:
            return
        with pytest.raises(KeyError):
            self.t.remove(self.dict_root, key)
        with pytest.raises(KeyError):
            self.t.lookup(self.dict_root, key)

    # -- set tree ---------------------------------------------------------------------

    @rule(keys=st.lists(_keys, max_size=120))
    def add_many(self, keys):
        for key in keys:
            self.set_root, added = self.t.assign(self.set_root, key, None, SET_LEAF)
            assert added == (key not in self.set_model)
            self.set_model.add(key)

    @precondition(lambda self: self.set_model)
    @rule(data=st.data())
    def discard_some(self, data):
        keys = data.draw(
            st.lists(st.sampled_from(sorted(self.set_model, key=order_key)), max_size=80, unique_by=order_key)
        )
        for key in keys:
            self.set_root, removed = self.t.remove(self.set_root, key, SET_LEAF)
            assert removed == key
            self.set_model.discard(key)

    # -- list tree --------------------------------------------------------------------

    @rule(data=st.data(), count=st.integers(1, 150))
    def insert_many(self, data, count):
        mode = data.draw(st.sampled_from(["append", "front", "random"]))
        rng = random.Random(data.draw(st.integers(0, 2**32)))
        for n in range(count):
            length = len(self.list_model)
            index = {"append": length, "front": 0, "random": rng.randint(0, length)}[mode]
            self.list_root = self.t.insert_at(self.list_root, index, n)
            self.list_model.insert(index, n)

    @precondition(lambda self: self.list_model)
    @rule(data=st.data(), count=st.integers(1, 150))
    def delete_many(self, data, count):
        mode = data.draw(st.sampled_from(["last", "front", "random"]))
        rng = random.Random(data.draw(st.integers(0, 2**32)))
        for _ in range(min(count, len(self.list_model))):
            length = len(self.list_model)
            index = {"last": length - 1, "front": 0, "random": rng.randrange(length)}[mode]
            self.list_root, removed = self.t.delete_at(self.list_root, index)
            assert removed == self.list_model.pop(index)

    @precondition(lambda self: self.list_model)
    @rule(data=st.data(), value=_values)
    def set_some(self, data, value):
        for index in data.draw(st.lists(st.integers(0, len(self.list_model) - 1), max_size=20)):
            self.list_root = self.t.set_at(self.list_root, index, value)
            self.list_model[index] = value

    # -- writing and versions ------------------------------------------------------------

    @rule(which=st.sampled_from(["dict", "set", "list", "all"]))
    def flush(self, which):
        if which in ("dict", "all"):
            self.dict_root = self.mem.flush(self.dict_root)
            self.versions.append((DICT_LEAF, self.dict_root, dict(self.dict_model)))
        if which in ("set", "all"):
            self.set_root = self.mem.flush(self.set_root)
            self.versions.append((SET_LEAF, self.set_root, set(self.set_model)))
        if which in ("list", "all"):
            self.list_root = self.mem.flush(self.list_root)
            self.versions.append((LIST_LEAF, self.list_root, list(self.list_model)))

    # -- checks -------------------------------------------------------------------------

    @invariant()
    def counts_match(self):
        if not hasattr(self, "t"):
            return
        assert self.t.count(self.dict_root, DICT_LEAF) == len(self.dict_model)
        assert self.t.count(self.set_root, SET_LEAF) == len(self.set_model)
        assert self.t.count(self.list_root, LIST_LEAF) == len(self.list_model)

    @rule()
    def check_everything(self):
        check_dict(self.t, self.dict_root, self.dict_model)
        check_set(self.t, self.set_root, self.set_model)
        check_list(self.t, self.list_root, self.list_model)

    @rule(data=st.data())
    def range_scan(self, data):
        start = data.draw(_keys)
        expected = [k for k in ordered(self.dict_model) if order_key(k) >= order_key(start)]
        scanned = [k for leaf in self.t.leaves(self.dict_root, DICT_LEAF, start) for k in leaf.keys]
        assert [k for k in scanned if order_key(k) >= order_key(start)] == expected
        backwards = [k for leaf in self.t.leaves(self.dict_root, DICT_LEAF, reverse=True) for k in reversed(leaf.keys)]
        assert backwards == ordered(self.dict_model)[::-1]

    def teardown(self):
        if not hasattr(self, "t"):
            return
        self.check_everything()
        fresh = self.mem.fresh()
        for kind, ptr, model in self.versions:  # old versions are untouched by later changes
            for access in (self.t, fresh):
                {DICT_LEAF: check_dict, SET_LEAF: check_set, LIST_LEAF: check_list}[kind](access, ptr, model)


def check_dict(t: TreeAccess, root, model: dict) -> None:
    assert list(t.items(root)) == [(k, model[k]) for k in ordered(model)]
    for key, value in model.items():
        assert t.lookup(root, key) == value
    assert t.check_tree(root, DICT_LEAF, no_values) == len(model)


def check_set(t: TreeAccess, root, model: set) -> None:
    assert list(t.keys(root, SET_LEAF)) == ordered(model)
    for key in model:
        assert t.lookup(root, key, SET_LEAF) == key
    assert t.check_tree(root, SET_LEAF, no_values) == len(model)


def check_list(t: TreeAccess, root, model: list) -> None:
    assert list(t.values(root, LIST_LEAF)) == model
    assert [t.at(root, i) for i in range(len(model))] == model
    assert t.check_tree(root, LIST_LEAF, no_values) == len(model)


TreeMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
test_tree_machine = TreeMachine.TestCase


@pytest.mark.parametrize("seed", range(6))
def test_random_interleaving_against_models(seed):
    """Long random runs: trees several levels deep, flushed at random moments."""
    rng = random.Random(seed)
    mem = MemoryAtoms()
    t = mem.access
    droot: Node | int = 0
    sroot: Node | int = 0
    lroot: Node | int = 0
    dmodel: dict = {}
    smodel: set = set()
    lmodel: list = []
    versions = []
    for step in range(3000):
        key = rng.choice([rng.randrange(2000), f"k{rng.randrange(500)}"])
        if rng.random() < 0.6 or not dmodel:
            droot, _ = t.assign(droot, key, step)
            dmodel[key] = step
        else:
            key = rng.choice(list(dmodel))
            droot, value = t.remove(droot, key)
            assert value == dmodel.pop(key)
        if rng.random() < 0.55 or not smodel:
            sroot, _ = t.assign(sroot, key, None, SET_LEAF)
            smodel.add(key)
        else:
            key = rng.choice(list(smodel))
            sroot, _ = t.remove(sroot, key, SET_LEAF)
            smodel.discard(key)
        r = rng.random()
        if r < 0.5 or not lmodel:
            i = rng.randint(0, len(lmodel))
            lroot = t.insert_at(lroot, i, step)
            lmodel.insert(i, step)
        elif r < 0.75:
            i = rng.randrange(len(lmodel))
            lroot, value = t.delete_at(lroot, i)
            assert value == lmodel.pop(i)
        else:
            i = rng.randrange(len(lmodel))
            lroot = t.set_at(lroot, i, -step)
            lmodel[i] = -step
        if rng.random() < 0.05:
            droot, sroot, lroot = mem.flush(droot), mem.flush(sroot), mem.flush(lroot)
            versions.append((droot, dict(dmodel), sroot, set(smodel), lroot, list(lmodel)))
    check_dict(t, droot, dmodel)
    check_set(t, sroot, smodel)
    check_list(t, lroot, lmodel)
    fresh = mem.fresh()
    for d, dm, s, sm, li, lm in versions[-10:]:
        check_dict(fresh, d, dm)
        check_set(fresh, s, sm)
        check_list(fresh, li, lm)


def _depth(mem: MemoryAtoms, root: int) -> int:
    depth, node = 1, mem.load(root)
    while node.is_branch:
        depth, node = depth + 1, mem.load(node.values[0])
    return depth


@pytest.mark.parametrize("seed", range(2))
def test_three_levels_grow_and_drain_to_an_empty_root(seed):
    rng = random.Random(seed)
    mem = MemoryAtoms()
    t = mem.access
    root: Node | int = 0
    lroot: Node | int = 0
    keys = list(range(6000))
    rng.shuffle(keys)
    model: list = []
    for n, k in enumerate(keys):
        root, _ = t.assign(root, k, k)
        i = rng.randint(0, len(model))
        lroot = t.insert_at(lroot, i, k)
        model.insert(i, k)
        if n % 1000 == 999:
            root, lroot = mem.flush(root), mem.flush(lroot)
    assert _depth(mem, root) == 3 and _depth(mem, lroot) == 3
    check_dict(t, root, {k: k for k in keys})
    check_list(t, lroot, model)
    rng.shuffle(keys)
    for n, k in enumerate(keys):
        root, _ = t.remove(root, k)
        lroot, value = t.delete_at(lroot, i := rng.randrange(len(model)))
        assert value == model.pop(i)
        if n % 1000 == 500:
            root, lroot = mem.flush(root), mem.flush(lroot)
            check_dict(t, root, {k: k for k in keys[n + 1 :]})
            check_list(t, lroot, model)
    assert t.count(root, DICT_LEAF) == 0 and t.count(lroot, LIST_LEAF) == 0
    assert mem.flush(root) == 0 and mem.flush(lroot) == 0


@given(st.lists(st.integers(), max_size=300, unique=True))
@settings(max_examples=50, deadline=None)
def test_build_matches_incremental_contents(keys):
    mem = MemoryAtoms()
    t = mem.access
    keys = ordered(keys)
    root = mem.flush(t.build(DICT_LEAF, keys, [k * 2 for k in keys]))
    check_dict(t, root, {k: k * 2 for k in keys})
    sroot = mem.flush(t.build(SET_LEAF, keys, None))
    check_set(t, sroot, set(keys))
    lroot = mem.flush(t.build(LIST_LEAF, None, keys))
    check_list(t, lroot, keys)


def test_build_of_10k_sorted_keys_passes_check_tree():
    mem = MemoryAtoms()
    t = mem.access
    keys = list(range(10_000))
    built = t.build(DICT_LEAF, keys, [str(k) for k in keys])
    assert t.check_tree(built, DICT_LEAF, no_values) == 10_000  # dirty
    root = mem.flush(built)
    assert t.check_tree(root, DICT_LEAF, no_values) == 10_000  # written
    assert t.lookup(root, 9_999) == "9999"
    assert t.lookup(root, 0) == "0"
    # then it keeps working under changes
    for k in range(0, 10_000, 7):
        root, _ = t.remove(root, k)
    assert t.check_tree(mem.flush(root), DICT_LEAF, no_values) == 10_000 - len(range(0, 10_000, 7))


def test_flush_writes_values_through_write_value_and_visits_refs():
    mem = MemoryAtoms()
    t = mem.access
    root: Node | int = 0
    for k in range(200):
        root, _ = t.assign(root, k, ["container", k])
    written = []

    def write_value(value):
        written.append(value)
        return Ref(10_000 + value[1], 1)

    ptr = t.flush(root, mem.write_node, write_value)
    assert len(written) == 200
    seen = []
    assert t.check_tree(ptr, DICT_LEAF, seen.append) == 200
    assert sorted(r.ptr for r in seen) == [10_000 + k for k in range(200)]


def test_path_copying_reports_discarded_atoms():
    mem = MemoryAtoms()
    t = mem.access
    root = mem.flush(t.build(DICT_LEAF, list(range(5000)), [Ref(100_000 + k, 1) for k in range(5000)]))
    discarded = []
    t.on_discard = discarded.append
    new_root, _ = t.assign(root, 42, 0)
    # the copied path (root .. leaf) plus the replaced Ref value
    assert root in discarded
    assert 100_042 in discarded
    assert len(discarded) == _depth(mem, root) + 1
    assert t.lookup(root, 42) == Ref(100_042, 1)  # the old version is intact


# -- check_tree detects corruption ----------------------------------------------------------


def _two_level_dict(mem: MemoryAtoms, n: int = 500) -> int:
    return mem.flush(mem.access.build(DICT_LEAF, list(range(n)), list(range(n))))


def test_check_tree_detects_swapped_keys_in_a_leaf():
    mem = MemoryAtoms()
    root = _two_level_dict(mem)
    leaf_ptr = mem.load(root).values[1]
    leaf = decode_node(*mem.atoms[leaf_ptr], leaf_ptr)
    leaf.keys[3], leaf.keys[4] = leaf.keys[4], leaf.keys[3]
    mem.rewrite(leaf_ptr, leaf)
    with pytest.raises(CorruptionError, match="not in strictly increasing order"):
        mem.access.check_tree(root, DICT_LEAF, no_values)


def test_check_tree_detects_duplicate_keys():
    mem = MemoryAtoms()
    root = _two_level_dict(mem)
    leaf_ptr = mem.load(root).values[0]
    leaf = decode_node(*mem.atoms[leaf_ptr], leaf_ptr)
    leaf.keys[1] = leaf.keys[0]
    mem.rewrite(leaf_ptr, leaf)
    with pytest.raises(CorruptionError, match="strictly increasing"):
        mem.access.check_tree(root, DICT_LEAF, no_values)


def test_check_tree_detects_wrong_branch_sizes():
    mem = MemoryAtoms()
    root = _two_level_dict(mem)
    branch = decode_node(*mem.atoms[root], root)
    branch.sizes[2] += 1
    mem.rewrite(root, branch)
    with pytest.raises(CorruptionError, match="records 65 entries under child 2, found 64"):
        mem.access.check_tree(root, DICT_LEAF, no_values)


def test_check_tree_detects_wrong_list_sizes():
    mem = MemoryAtoms()
    root = mem.flush(mem.access.build(LIST_LEAF, None, list(range(500))))
    branch = decode_node(*mem.atoms[root], root)
    assert branch.kind == LIST_BRANCH
    branch.sizes[0] -= 1
    mem.rewrite(root, branch)
    with pytest.raises(CorruptionError, match="under child 0"):
        mem.access.check_tree(root, LIST_LEAF, no_values)


def test_check_tree_detects_a_key_outside_its_separators():
    mem = MemoryAtoms()
    root = _two_level_dict(mem)
    leaf_ptr = mem.load(root).values[2]
    leaf = decode_node(*mem.atoms[leaf_ptr], leaf_ptr)
    leaf.keys[-1] = 10_000  # still sorted inside the leaf, but above the next separator
    mem.rewrite(leaf_ptr, leaf)
    with pytest.raises(CorruptionError, match="at or above its separator"):
        mem.access.check_tree(root, DICT_LEAF, no_values)
    leaf.keys[-1] = leaf.keys[-2] + 0.5
    leaf.keys[0] = -1  # below the separator on its left
    mem.rewrite(leaf_ptr, leaf)
    with pytest.raises(CorruptionError, match="below its separator"):
        mem.access.check_tree(root, DICT_LEAF, no_values)


def test_check_tree_detects_a_node_of_the_wrong_kind():
    mem = MemoryAtoms()
    root = _two_level_dict(mem)
    leaf_ptr = mem.load(root).values[0]
    leaf = decode_node(*mem.atoms[leaf_ptr], leaf_ptr)
    mem.rewrite(leaf_ptr, Node(SET_LEAF, leaf.keys, None))
    with pytest.raises(CorruptionError, match=f"of kind {SET_LEAF} inside a tree of kind {DICT_LEAF}"):
        mem.access.check_tree(root, DICT_LEAF, no_values)


def test_check_tree_detects_overfull_and_empty_nodes():
    mem = MemoryAtoms()
    keys = list(range(MAX_ENTRIES + 1))
    ptr = mem.write_node(Node(DICT_LEAF, keys, keys))
    with pytest.raises(CorruptionError, match=f"holds {MAX_ENTRIES + 1} entries"):
        mem.access.check_tree(ptr, DICT_LEAF, no_values)
    empty_leaf = mem.write_node(Node(DICT_LEAF, [], []))
    full_leaf = mem.write_node(Node(DICT_LEAF, [5], [5]))
    branch = mem.write_node(Node(DICT_BRANCH, [5], [empty_leaf, full_leaf], [0, 1]))
    with pytest.raises(CorruptionError, match="holds 0 entries"):
        mem.access.check_tree(branch, DICT_LEAF, no_values)


def test_check_tree_detects_leaves_at_different_depths():
    mem = MemoryAtoms()
    left = mem.write_node(Node(DICT_LEAF, [1], [1]))
    deep_leaf = mem.write_node(Node(DICT_LEAF, [5], [5]))
    middle = mem.write_node(Node(DICT_BRANCH, [], [deep_leaf], [1]))
    root = mem.write_node(Node(DICT_BRANCH, [5], [left, middle], [1, 1]))
    with pytest.raises(CorruptionError, match=r"leaves at depths \[1, 2\]"):
        mem.access.check_tree(root, DICT_LEAF, no_values)


@pytest.mark.parametrize(
    ("kind", "parts"),
    [
        (DICT_LEAF, [[1, 2], [1]]),  # counts differ
        (DICT_LEAF, [[1]]),  # missing part
        (LIST_BRANCH, [[8, 16], [1]]),
        (LIST_BRANCH, [[], []]),  # an empty branch
        (DICT_BRANCH, [[1, 2], [8, 16], [1, 1]]),  # too many separators
        (SET_LEAF, 5),
    ],
)
def test_decode_node_rejects_bad_shapes(kind, parts):
    from protobase.core import codec

    with pytest.raises(CorruptionError):
        decode_node(kind, codec.encode(parts), 0x40)


def test_decode_node_rejects_garbage():
    with pytest.raises(CorruptionError):
        decode_node(DICT_LEAF, b"\xc1\xc1", 0x40)
