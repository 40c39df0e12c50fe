"""Point searches in encoded tree nodes: from a tree's root pointer to the slot under a key.

Owns the point lookup of a clean dict or set tree read straight from its
atoms: `Searcher.lookup(root, key, leaf_kind)` walks branch to leaf and
returns the slot stored under `key` (a scalar or a Ref; for a set tree the
key), `Searcher.value(ptr, ref)` decodes one VALUE atom. Nothing is cached
here: the Store (store.py) decides what to keep. And the point write the
coordinator makes most: `Searcher.splice(root, keys, make_entry, append, pack_key, absent)`
walks a path of dict trees and writes each node on it again with one entry
set, in its bytes (coordinator/writer.py, `Writer._spliced`), and
`Searcher.splice_set(root, keys, adding, append, pack_key)` removes and adds
an index's entries in its set tree's bytes, the index upkeep of such a write.

Two implementations, function for function: these pure-Python ones decode a
node and bisect it (the oracle, and the fallback without a compiler), and
their compiled twins in cnode.c read the node's bytes in place and build a
Python object for the one entry they return, so a cold point read does not
build the 64 entries of every node it passes. `leaf_slot`, `branch_child` and
`Searcher` are the compiled ones unless PROTOBASE_PURE_PYTHON=1 or the build
lacked a compiler (protobase/native.py); the `*_python` names are always these.

Runs in every process that reads trees (clients, pool workers, the
coordinator's Store).

Invariant: both implementations return the same slot (or raise KeyError) for
every key of keyorder.py's key types on every tree the coordinator writes,
`splice` and `splice_set` write the payloads that copying, changing and encoding the nodes gives, and
neither trusts the bytes: a malformed node, a bad pointer or a walk deeper than
`MAX_DEPTH` levels (a cycle) is a CorruptionError.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any, NamedTuple

from protobase import native
from protobase.core import codec
from protobase.core.arena import DICT_BRANCH, DICT_LEAF, SET_BRANCH, SET_LEAF
from protobase.core.btree.node import MAX_ENTRIES, MERGE_BELOW, Node, decode_node, encode_node
from protobase.core.frozen import FrozenDict, FrozenList
from protobase.errors import CorruptionError
from protobase.keyorder import KEY_TYPES, bisect_left, bisect_right, order_key

__all__ = [
    "MAX_DEPTH",
    "Searcher",
    "SearcherPython",
    "branch_child",
    "branch_child_python",
    "leaf_slot",
    "leaf_slot_python",
    "COMPILED",
]

#: No tree of 64-way nodes in 2^40-byte segments is this deep: a deeper walk is a cycle.
MAX_DEPTH = 64

_BRANCH_OF_LEAF = {DICT_LEAF: DICT_BRANCH, SET_LEAF: SET_BRANCH}
_MAX_LEVELS = 128  # nodes one splice may rewrite (cnode.c's MAX_LEVELS)
_NO_KEY = object()  # splice's entry sets a value: no key is inserted
_LEFT_HALF = (MAX_ENTRIES + 1) // 2  # the keys a leaf of MAX_ENTRIES + 1 keeps when it splits (TreeWriter._split_child)

Atom = Callable[[int], tuple[int, memoryview]]  # AtomReader.atom: pointer -> (kind, payload)
Fallback = Callable[[int, Any, int], Any]  # (root, key, leaf_kind) -> slot: the decoded-node lookup


def leaf_slot_python(kind: int, payload: memoryview | bytes, key: Any) -> Any:
    """The slot under `key` in an encoded dict leaf (for a set leaf: the key); KeyError if absent."""
    if kind != DICT_LEAF and kind != SET_LEAF:
        raise CorruptionError(f"tree node: a dict or set leaf was expected, found kind {kind}")
    node = decode_node(kind, payload, 0)
    keys = node.keys
    if type(keys) is not list or (node.values is not None and type(node.values) is not list):
        raise CorruptionError("tree node: does not have the node shape")
    i = _bisect(bisect_left, keys, key)
    if i < len(keys) and keys[i] == key:
        return node.values[i] if node.values is not None else keys[i]
    raise KeyError(key)


def branch_child_python(kind: int, payload: memoryview | bytes, key: Any) -> int:
    """The pointer of the child of an encoded dict or set branch whose subtree may hold `key`."""
    if kind != DICT_BRANCH and kind != SET_BRANCH:
        raise CorruptionError(f"tree node: a dict or set branch was expected, found kind {kind}")
    node = decode_node(kind, payload, 0)
    if type(node.keys) is not list or type(node.values) is not list:
        raise CorruptionError("tree node: does not have the node shape")
    child = node.values[_bisect(bisect_right, node.keys, key)]
    if type(child) is not int or child <= 0:
        raise CorruptionError("tree node: a child pointer is not a pointer")
    return child


def _bisect(bisect: Callable[[list[Any], Any], int], keys: list[Any], key: Any) -> int:
    """`bisect(keys, key)`; a stored key of no key type (keyorder cannot place it) is a corruption."""
    try:
        return bisect(keys, key)
    except (TypeError, KeyError):
        raise CorruptionError("tree node: a stored key is of no key type") from None


class SearcherPython:
    """Point lookups in the trees of one process's mapped segments (the oracle of cnode.Searcher).

    `buffers` is the AtomReader's {segment index -> mapped bytes} (the compiled
    twin reads atoms from it in place), `atom` its `atom(ptr)`, and
    `fallback(root, key, leaf_kind)` the lookup the compiled twin hands keys to
    that are not of an exact key type (a str subclass, say); this one needs neither.
    """

    def __init__(self, buffers: dict[int, memoryview], atom: Atom, fallback: Fallback) -> None:
        self.buffers = buffers  # {segment index -> memoryview}: unused here, read by the compiled twin
        self.atom = atom
        self.fallback = fallback

    def lookup(self, root: int, key: Any, leaf_kind: int) -> Any:
        """The slot under `key` in the dict (or set) tree at `root`; KeyError if absent."""
        if leaf_kind != DICT_LEAF and leaf_kind != SET_LEAF:
            raise ValueError("lookup needs a dict or set tree")
        branch_kind = _BRANCH_OF_LEAF[leaf_kind]
        ptr = root
        if ptr == 0:
            raise KeyError(key)
        for _ in range(MAX_DEPTH + 1):
            kind, payload = self.atom(ptr)
            if kind == leaf_kind:
                return leaf_slot_python(kind, payload, key)
            if kind != branch_kind:
                raise CorruptionError(f"tree node {ptr:#x}: not a node of its tree")
            ptr = branch_child_python(kind, payload, key)
        raise CorruptionError(f"tree node {ptr:#x}: the tree is deeper than any tree can be (a cycle)")

    def splice(
        self,
        root: int,
        keys: Sequence[Any],
        make_entry: Callable[[Any], bytes],
        append: Callable[[int, bytes], int],
        pack_key: Callable[[Any], bytes],
        absent: Any,
    ) -> tuple[int, Any, list[tuple[int, int]]] | None:
        """Set the value at the path `keys` of dict trees, in the nodes' bytes; None if it does not qualify.

        It qualifies when every key is of a key type, every container on the
        path is a dict tree (its leaves hold a Ref to the next), and the last
        key is present, or absent from a leaf with room for it, or from a full
        leaf under a branch of its tree with room for one more child: that
        leaf is written as its two halves, left first, its parent taking both
        (TreeWriter._split_child). Then `make_entry(old slot, or absent)` gives
        the new value's encoding (asked once the left half is written when the
        new key goes right of the middle, as a flush writes the value with its
        half), and every node on the path is written again,
        bottom-up, through `append(kind, payload)`, with one entry set: the
        value (for a new key, the key too, `pack_key(key)`, and the counts of
        its tree's nodes), then each child's new pointer (in a branch) or Ref
        (in a leaf). The payloads are byte for byte what copying the nodes,
        changing them and encoding them gives, which is what this twin does.
        Returns (the new root's pointer, the old slot or `absent`,
        [(pointer, payload length)] of each node replaced); nothing is
        written when it returns None.
        """
        found = self._walk(root, keys)
        if found is None:
            return None
        levels, old, present = found
        if not present:
            pack_key(keys[-1])  # as the compiled twin asks for it
            old = absent
        split = not present and len(levels[-1][1].keys or ()) == MAX_ENTRIES
        # A split leaf whose new key goes right of the middle: its left half is written first, as a flush does.
        entry = make_entry(old) if not split or levels[-1][2] < _LEFT_HALF else None
        halves: tuple[int, int, Any] | None = None  # a split leaf's (left, right, separator)
        retired = []
        for i in range(len(levels) - 1, -1, -1):
            ptr, node, position, last_tree = levels[i]
            assert node.keys is not None and node.values is not None and node.ptr is not None
            retired.append((ptr, len(self.atom(ptr)[1])))
            copy = Node(node.kind, node.keys[:], node.values[:], None if node.sizes is None else node.sizes[:])
            assert copy.keys is not None and copy.values is not None
            if split and i == len(levels) - 1:
                halves = self._split_leaf(copy, keys[-1], position, entry, lambda: make_entry(old), append)
                continue
            if halves is not None and i == len(levels) - 2:
                _take_halves(copy, position, halves)
            else:
                self._set_entry(copy, position, entry, keys[-1] if last_tree and not present else _NO_KEY)
            written = append(node.kind, encode_node(copy))
            if i > 0:
                parent_kind = levels[i - 1][1].kind
                entry = codec.pack(written if parent_kind == DICT_BRANCH else codec.Ref(written, node.kind))
        retired.reverse()
        return written, old, retired

    @staticmethod
    def _set_entry(copy: Node, position: int, entry: bytes | None, new_key: Any) -> None:
        """splice's change to one copied node: the entry at `position` set (for a `new_key`, inserted in a
        leaf, counted in a branch)."""
        assert entry is not None and copy.keys is not None and copy.values is not None, "made before, or by a split"
        value = codec.decode(entry, frozen=False)
        if new_key is not _NO_KEY and copy.sizes is not None:
            copy.sizes[position] += 1
        if new_key is not _NO_KEY and copy.sizes is None:
            copy.keys.insert(position, new_key)
            copy.values.insert(position, value)
        else:
            copy.values[position] = value

    @staticmethod
    def _split_leaf(
        copy: Node,
        key: Any,
        position: int,
        entry: bytes | None,
        make_entry: Callable[[], bytes],
        append: Callable[[int, bytes], int],
    ) -> tuple[int, int, Any]:
        """splice's full leaf with `key` inserted, written as its two halves (left first, `entry` made after
        it when None): (left, right, separator), as TreeWriter._split_child and a flush make them."""
        assert copy.keys is not None and copy.values is not None
        left = None
        if entry is None:
            left = append(DICT_LEAF, encode_node(Node(DICT_LEAF, copy.keys[:_LEFT_HALF], copy.values[:_LEFT_HALF])))
            entry = make_entry()
        copy.keys.insert(position, key)
        copy.values.insert(position, codec.decode(entry, frozen=False))
        if left is None:
            left = append(DICT_LEAF, encode_node(Node(DICT_LEAF, copy.keys[:_LEFT_HALF], copy.values[:_LEFT_HALF])))
        right = append(DICT_LEAF, encode_node(Node(DICT_LEAF, copy.keys[_LEFT_HALF:], copy.values[_LEFT_HALF:])))
        return left, right, copy.keys[_LEFT_HALF]

    def _walk(self, root: int, keys: Sequence[Any]) -> tuple[list[tuple[int, Node, int, bool]], Any, bool] | None:
        """splice's walk: each node on the path (ptr, node, position, in the last tree), the old slot, and
        whether the last key is present."""
        levels: list[tuple[int, Node, int, bool]] = []
        ptr, old = root, None
        if not ptr or not keys:
            return None
        for j, key in enumerate(keys):
            if type(key) not in KEY_TYPES:
                return None
            last_tree = j == len(keys) - 1
            for _ in range(MAX_DEPTH + 1):
                if len(levels) == _MAX_LEVELS:
                    return None
                kind, payload = self.atom(ptr)
                if kind != DICT_BRANCH and kind != DICT_LEAF:
                    raise CorruptionError(f"tree node {ptr:#x}: not a node of its tree")
                node = decode_node(kind, payload, ptr)
                assert node.keys is not None and node.values is not None, "a dict node"
                if kind == DICT_BRANCH:
                    levels.append((ptr, node, _bisect(bisect_right, node.keys, key), last_tree))
                    ptr = branch_child_python(kind, payload, key)
                    continue
                i = _bisect(bisect_left, node.keys, key)
                levels.append((ptr, node, i, last_tree))
                if i == len(node.keys) or node.keys[i] != key:
                    return (levels, None, False) if last_tree and self._has_room(levels) else None
                old = node.values[i]
                break
            else:
                raise CorruptionError(f"tree node {ptr:#x}: the tree is deeper than any tree can be (a cycle)")
            if not last_tree:
                if type(old) is not codec.Ref or old.kind not in (DICT_LEAF, DICT_BRANCH) or not old.ptr:
                    return None  # no dict tree below: a value, a flat dict, an indexed collection
                ptr = old.ptr
        return levels, old, True

    def splice_set(
        self,
        root: int,
        keys: Sequence[Any],
        adding: Sequence[bool],
        append: Callable[[int, bytes], int] | None,
        pack_key: Callable[[Any], bytes],
    ) -> tuple[int, list[tuple[int, int]]] | None:
        """Remove and add keys of the set tree at `root` in its nodes' bytes (an index's upkeep), or None.

        `keys` are distinct and in canonical order, `adding[i]` says whether
        keys[i] is added (it must be absent) or removed (present). It
        qualifies when TreeWriter, removing them and then adding them, would
        neither merge nor empty a node, nor split anything but a leaf its last
        add overflows (under a branch with room for one more child). Then
        every node on their paths is written once through
        `append(kind, payload)`, bottom-up and left to right as a flush writes
        them (a split leaf as its two halves), each the payload copying,
        changing and encoding it gives, which is what this twin does;
        `pack_key(key)` is asked for each added key first. Returns (the new root's pointer,
        [(pointer, payload length)] of each node replaced, in that order);
        with `append` None, nothing is written and the pointer is 0. Nothing is
        written when it returns None.
        """
        if not root or not keys or any(type(key) not in KEY_TYPES for key in keys):
            return None
        for key, add in zip(keys, adding, strict=True):
            if add:
                pack_key(key)  # as the compiled twin asks for it
        plan: list[_Planned] = []
        if self._plan_set(root, keys, adding, True, 0, plan) is None:
            return None
        retired = [(planned.ptr, len(self.atom(planned.ptr)[1])) for planned in plan]
        return (0 if append is None else _write_set_plan(plan, append)), retired

    def _plan_set(
        self,
        ptr: int,
        keys: Sequence[Any],
        adding: Sequence[bool],
        is_root: bool,
        depth: int,
        plan: list[_Planned],
    ) -> int | None:
        """splice_set's plan of the node at `ptr` for `keys`, after its children: its place in `plan`, or None."""
        if depth > MAX_DEPTH:
            raise CorruptionError(f"tree node {ptr:#x}: the tree is deeper than any tree can be (a cycle)")
        kind, payload = self.atom(ptr)
        if kind != SET_BRANCH and kind != SET_LEAF:
            raise CorruptionError(f"tree node {ptr:#x}: not a node of its tree")
        node = decode_node(kind, payload, ptr)
        assert node.keys is not None
        removing = not all(adding)
        children: list[tuple[int, int]] = []
        split = False
        if kind == SET_LEAF:
            lowest = 0  # where the next key may be: past a removed one
            for key, add in zip(keys, adding, strict=True):
                position = _bisect(bisect_left, node.keys, key)
                if (position < len(node.keys) and node.keys[position] == key) == add:
                    return None  # path copying would change nothing, or raise
                if position < lowest:
                    raise ValueError("splice_set: the keys must be distinct and in canonical order")
                lowest = position + (not add)
            width = len(node.keys) - adding.count(False) + adding.count(True)
            if removing and not is_root and len(node.keys) - adding.count(False) < MERGE_BELOW:
                return None
            if width > MAX_ENTRIES + 1 or (is_root and (width == 0 or width > MAX_ENTRIES)):
                return None  # it would split more than once, grow the tree, or empty it
            split = width == MAX_ENTRIES + 1
        else:
            assert node.values is not None
            positions = [_bisect(bisect_right, node.keys, key) for key in keys]
            if positions != sorted(positions):
                raise ValueError("splice_set: the keys must be distinct and in canonical order")
            if removing and (len(node.values) < 2 if is_root else len(node.values) < MERGE_BELOW):
                return None
            start = 0
            while start < len(keys):
                end = start + 1
                while end < len(keys) and positions[end] == positions[start]:
                    end += 1
                place = self._plan_set(
                    node.values[positions[start]], keys[start:end], adding[start:end], False, depth + 1, plan
                )
                if place is None:
                    return None
                children.append((positions[start], place))
                start = end
            if len(node.values) + sum(plan[place].split for _, place in children) > MAX_ENTRIES:
                return None  # its children that split would split it
        plan.append(_Planned(ptr, node, children, adding.count(True) - adding.count(False), split, keys, adding))
        return len(plan) - 1

    @staticmethod
    def _has_room(levels: list[tuple[int, Node, int, bool]]) -> bool:
        """Whether a new key fits the leaf at the end of `levels`: it has room, or it splits under a branch
        of its tree with room for one more child."""
        leaf = levels[-1][1]
        assert leaf.keys is not None
        if len(leaf.keys) < MAX_ENTRIES:
            return True
        if len(levels) < 2 or not levels[-2][3] or levels[-2][1].kind != DICT_BRANCH:
            return False
        children = levels[-2][1].values
        return len(leaf.keys) == MAX_ENTRIES and children is not None and len(children) < MAX_ENTRIES

    def value(self, ptr: int, ref: Callable[[int, int], Any] | None) -> tuple[Any, int]:
        """(the VALUE atom at `ptr` decoded frozen, Refs in it through `ref`; its payload length)."""
        payload = self.atom(ptr)[1]
        return codec.decode(payload, frozen=True, ref=ref), len(payload)


class _Planned(NamedTuple):
    """A node splice_set writes again: the changes under it, its children's (position, place in the plan)."""

    ptr: int
    node: Node
    children: list[tuple[int, int]]
    delta: int  # keys added minus keys removed under it
    split: bool  # a leaf written as two halves
    keys: Sequence[Any]
    adding: Sequence[bool]


def _write_set_plan(plan: list[_Planned], append: Callable[[int, bytes], int]) -> int:
    """Write splice_set's plan, node after node (a split leaf as its two halves); the new root's pointer."""
    written: list[tuple[int, tuple[int, Any] | None]] = []  # (pointer, a split leaf's (right half, separator))
    for planned in plan:
        node = planned.node
        assert node.keys is not None, "a set node"
        if node.sizes is None:
            keys = _changed_keys(node.keys, planned.keys, planned.adding)
            if len(keys) <= MAX_ENTRIES:
                written.append((append(SET_LEAF, encode_node(Node(SET_LEAF, keys, None))), None))
                continue
            left = append(SET_LEAF, encode_node(Node(SET_LEAF, keys[:_LEFT_HALF], None)))
            right = append(SET_LEAF, encode_node(Node(SET_LEAF, keys[_LEFT_HALF:], None)))
            written.append((left, (right, keys[_LEFT_HALF])))
            continue
        assert node.values is not None and node.sizes is not None, "a branch"
        copy = Node(SET_BRANCH, node.keys[:], node.values[:], node.sizes[:])
        for position, place in reversed(planned.children):  # from the right: positions stay put
            ptr, split = written[place]
            if split is not None:
                _take_halves(copy, position, (ptr, *split))
                continue
            copy.values[position] = ptr  # type: ignore[index]
            copy.sizes[position] += plan[place].delta  # type: ignore[index]
        written.append((append(SET_BRANCH, encode_node(copy)), None))
    return written[-1][0]


def _take_halves(branch: Node, position: int, halves: tuple[int, int, Any]) -> None:
    """A copied branch whose child at `position` split into `halves` (left, right, separator)."""
    assert branch.keys is not None and branch.values is not None and branch.sizes is not None, "a branch"
    left, right, separator = halves
    branch.values[position : position + 1] = [left, right]
    branch.sizes[position : position + 1] = [_LEFT_HALF, MAX_ENTRIES + 1 - _LEFT_HALF]
    branch.keys.insert(position, separator)


def _changed_keys(stored: list[Any], keys: Sequence[Any], adding: Sequence[bool]) -> list[Any]:
    """A leaf's keys with `keys` removed or added (in canonical order, as splice_set's plan checked)."""
    changed: list[Any] = []
    at = 0
    for key, add in zip(keys, adding, strict=True):
        position = _bisect(bisect_left, stored, key)
        changed += stored[at:position]
        at = position if add else position + 1
        if add:
            changed.append(key)
    return changed + stored[at:]


_compiled = native.load("protobase.core.cnode") if codec.COMPILED else None
if _compiled is not None:
    _compiled.configure(codec.unpack, codec.Ref, CorruptionError, order_key, Decimal, uuid.UUID, FrozenDict, FrozenList)
    leaf_slot: Callable[[int, memoryview | bytes, Any], Any] = _compiled.leaf_slot
    branch_child: Callable[[int, memoryview | bytes, Any], int] = _compiled.branch_child
    Searcher: type[SearcherPython] = _compiled.Searcher
else:
    leaf_slot = leaf_slot_python
    branch_child = branch_child_python
    Searcher = SearcherPython

#: Whether this process searches encoded nodes with the compiled twin (cnode.c).
COMPILED = _compiled is not None
