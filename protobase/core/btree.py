"""Persistent B+trees of atoms: large dicts, sets and lists.

Owns the node format and every tree algorithm. Readers walk trees of clean
nodes; the coordinator changes them by path copying: a change copies the
nodes on one root-to-leaf path and shares the rest, so committing one key
writes O(log n) atoms, never the whole collection.

Three shapes share one node type:

* dict trees (DICT_LEAF / DICT_BRANCH): keys in canonical order (keyorder.py),
  leaves hold values: scalars inline, containers as a Ref to their own atom;
* set trees (SET_LEAF / SET_BRANCH): keys only;
* list trees (LIST_LEAF / LIST_BRANCH): no keys, positions found through
  each branch's subtree sizes (a counted B-tree).

Node payloads (msgpack, inside an atom whose header gives the kind):

    DICT_LEAF    [keys, values]
    SET_LEAF     [keys]
    LIST_LEAF    [values]
    DICT_BRANCH  [separators, child pointers, subtree sizes]   len(separators) == children - 1
    SET_BRANCH   [separators, child pointers, subtree sizes]   separator i = smallest key of child i+1
    LIST_BRANCH  [child pointers, subtree sizes]

Invariants (checked by `check_tree`): keys strictly increasing across the
tree, every separator bounds its children, branch sizes equal the counts
below them, all leaves at one depth, no empty node but an empty root, no node
over `MAX_ENTRIES`.

A `Node` with `ptr is None` is dirty: the coordinator built it during the
current commit, may mutate it in place, and writes it with `flush`. A node with
a pointer is clean and never mutated again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Any

from protobase.core import codec
from protobase.core.arena import DICT_BRANCH, DICT_LEAF, LIST_BRANCH, LIST_LEAF, SET_BRANCH, SET_LEAF
from protobase.core.codec import Ref
from protobase.errors import CorruptionError
from protobase.keyorder import bisect_left, bisect_right, order_key

__all__ = ["Node", "MAX_ENTRIES", "decode_node", "encode_node", "empty", "TreeAccess"]

MAX_ENTRIES = 64  # entries per leaf, children per branch
MERGE_BELOW = MAX_ENTRIES // 4  # a node this small is merged into a neighbour

BRANCH_OF = {DICT_LEAF: DICT_BRANCH, SET_LEAF: SET_BRANCH, LIST_LEAF: LIST_BRANCH}
LEAF_OF = {DICT_BRANCH: DICT_LEAF, SET_BRANCH: SET_LEAF, LIST_BRANCH: LIST_LEAF,
           DICT_LEAF: DICT_LEAF, SET_LEAF: SET_LEAF, LIST_LEAF: LIST_LEAF}
BRANCHES = frozenset(BRANCH_OF.values())
TREE_KINDS = frozenset(BRANCH_OF) | BRANCHES


class Node:
    """One decoded tree node; clean when `ptr` is set, dirty (being built) when None."""

    __slots__ = ("kind", "keys", "values", "sizes", "ptr", "ends", "order_keys")

    def __init__(self, kind: int, keys: list | None, values: list | None,
                 sizes: list | None = None, ptr: int | None = None) -> None:
        self.kind = kind
        self.keys = keys  # sorted keys (dict/set leaves), separators (dict/set branches), or None
        self.values = values  # leaf values, or branch children (int pointer or Node)
        self.sizes = sizes  # branches: entry count of each child's subtree; leaves: None
        self.ptr = ptr  # AtomPointer once written
        self.ends = None  # list branches: cumulative sizes, computed on first positional lookup
        self.order_keys = None  # clean nodes: order_key of each key, computed on first range search


    @property
    def is_branch(self) -> bool:
        return self.sizes is not None

    def count(self) -> int:
        if self.sizes is not None:
            return sum(self.sizes)
        return len(self.keys if self.values is None else self.values)

    def width(self) -> int:
        """Entries in a leaf, children in a branch."""
        return len(self.values if self.values is not None else self.keys)


def empty(leaf_kind: int) -> Node:
    """A new, empty, dirty tree root."""
    return Node(leaf_kind, None if leaf_kind == LIST_LEAF else [],
                None if leaf_kind == SET_LEAF else [])


def decode_node(kind: int, payload: memoryview | bytes, ptr: int) -> Node:
    """Decode a node atom, checking its shape; a bad one raises CorruptionError."""
    parts = codec.decode(payload, frozen=False)
    try:
        if kind == DICT_LEAF:
            keys, values = parts
            ok = len(keys) == len(values)
            return _checked(ok, Node(kind, keys, values, None, ptr), ptr)
        if kind == SET_LEAF:
            (keys,) = parts
            return Node(kind, keys, None, None, ptr)
        if kind == LIST_LEAF:
            (values,) = parts
            return Node(kind, None, values, None, ptr)
        if kind == LIST_BRANCH:
            children, sizes = parts
            return _checked(len(children) == len(sizes) > 0, Node(kind, None, children, sizes, ptr), ptr)
        keys, children, sizes = parts
        ok = len(children) == len(sizes) == len(keys) + 1
        return _checked(ok, Node(kind, keys, children, sizes, ptr), ptr)
    except (TypeError, ValueError):
        raise CorruptionError(f"tree node {ptr:#x} (kind {kind}) does not have the node shape") from None


def _checked(ok: bool, node: Node, ptr: int) -> Node:
    if not ok:
        raise CorruptionError(f"tree node {ptr:#x} has mismatched key, value and size counts")
    return node


def encode_node(node: Node, encode_keys: Callable[[list], bytes] | None = None) -> bytes:
    """Payload of a node whose children and values are all written (ints and Refs).

    `encode_keys(keys)`, when given, returns the encoding of the keys list
    (the writer's `codec.KeyMemo`, which remembers index entries); the
    payload is byte for byte what encoding the whole node gives.
    """
    kind = node.kind
    if encode_keys is not None and node.keys and kind != LIST_BRANCH:
        keys = encode_keys(node.keys)
        if kind == SET_LEAF:
            return codec.array_header(1) + keys
        if kind == DICT_LEAF:
            return codec.array_header(2) + keys + codec.encode(node.values)
        return codec.array_header(3) + keys + codec.encode(node.values) + codec.encode(node.sizes)
    if kind == DICT_LEAF:
        return codec.encode([node.keys, node.values])
    if kind == SET_LEAF:
        return codec.encode([node.keys])
    if kind == LIST_LEAF:
        return codec.encode([node.values])
    if kind == LIST_BRANCH:
        return codec.encode([node.values, node.sizes])
    return codec.encode([node.keys, node.values, node.sizes])


class TreeAccess:
    """Tree algorithms over a node loader; the coordinator's instance also writes.

    `load(ptr)` returns the clean Node at a pointer (cached by the caller).
    Slots passed around are a Node or an int pointer (0 = empty tree).
    """

    def __init__(self, load: Callable[[int], Node]) -> None:
        self.load = load
        # Told the pointer of every atom a change stops using (a copied node, a
        # replaced or removed Ref value); the coordinator counts reclaimable bytes.
        self.on_discard: Callable[[int], None] | None = None

    def node(self, slot: Node | int, leaf_kind: int) -> Node:
        if type(slot) is Node:
            return slot
        if slot == 0:
            return empty(leaf_kind)
        return self.load(slot)

    # -- reading ------------------------------------------------------------

    def lookup(self, root: Node | int, key: Any, leaf_kind: int = DICT_LEAF) -> Any:
        """The value stored under `key` in a dict tree (for a set tree: the key); KeyError if absent."""
        node = self.node(root, leaf_kind)
        load = self.load
        while node.sizes is not None:
            child = node.values[bisect_right(node.keys, key)]
            node = child if type(child) is Node else load(child)
        keys = node.keys
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            return node.values[i] if node.values is not None else keys[i]
        raise KeyError(key)

    def at(self, root: Node | int, index: int) -> Any:
        """The value at position `index` (0 <= index < count) of a list tree."""
        node = self.node(root, LIST_LEAF)
        while node.sizes is not None:
            ends = node.ends
            if ends is None:
                ends = node.ends = list(accumulate(node.sizes))
            i = bisect_right(ends, index)
            if i:
                index -= ends[i - 1]
            child = node.values[i]
            node = child if type(child) is Node else self.load(child)
        return node.values[index]

    def count(self, root: Node | int, leaf_kind: int) -> int:
        return self.node(root, leaf_kind).count()

    def leaves(self, root: Node | int, leaf_kind: int, start: Any = None, reverse: bool = False) -> Iterator[Node]:
        """Leaves in order (or reverse); with `start`, from the leaf that may hold it."""
        node = self.node(root, leaf_kind)
        if node.sizes is None:
            if node.width():
                yield node
            return
        children = node.values
        order = range(len(children) - 1, -1, -1) if reverse else range(len(children))
        first = bisect_right(node.keys, start) if start is not None and node.keys is not None else None
        for i in order:
            if first is not None and not reverse and i < first:
                continue
            child = children[i]
            yield from self.leaves(child if type(child) is Node else self.load(child), leaf_kind,
                                   start if i == first else None, reverse)

    def keys_at(self, root: Node | int, leaf_kind: int, start: int, stop: int) -> Iterator[Any]:
        """Keys at positions [start, stop) of a dict or set tree, found through subtree sizes."""
        for leaf, first, last in self._leaves_at(root, leaf_kind, start, stop):
            yield from leaf.keys[first:last]

    def values_at(self, root: Node | int, leaf_kind: int, start: int, stop: int) -> Iterator[Any]:
        """Values at positions [start, stop) of a list (or dict) tree, leaf by leaf."""
        for leaf, first, last in self._leaves_at(root, leaf_kind, start, stop):
            yield from leaf.values[first:last]

    def _leaves_at(self, root: Node | int, leaf_kind: int, start: int, stop: int) -> Iterator[tuple[Node, int, int]]:
        node = self.node(root, leaf_kind)
        if node.sizes is None:
            yield node, start, stop
            return
        offset = 0
        for child, size in zip(node.values, node.sizes):
            if offset >= stop:
                return
            if offset + size > start:
                yield from self._leaves_at(child, leaf_kind, max(0, start - offset), stop - offset)
            offset += size


    def items(self, root: Node | int, leaf_kind: int = DICT_LEAF) -> Iterator[tuple[Any, Any]]:
        for leaf in self.leaves(root, leaf_kind):
            yield from zip(leaf.keys, leaf.values)

    def keys(self, root: Node | int, leaf_kind: int) -> Iterator[Any]:
        for leaf in self.leaves(root, leaf_kind):
            yield from leaf.keys

    def values(self, root: Node | int, leaf_kind: int) -> Iterator[Any]:
        for leaf in self.leaves(root, leaf_kind):
            yield from leaf.values

    # -- building (coordinator) ---------------------------------------------

    def mutable(self, slot: Node | int, leaf_kind: int) -> Node:
        """A dirty node to change in place: the slot itself if dirty, else a copy."""
        node = self.node(slot, leaf_kind)
        if node.ptr is None and type(slot) is Node:
            return node
        if node.ptr is not None and self.on_discard is not None:
            self.on_discard(node.ptr)
        return Node(node.kind, None if node.keys is None else node.keys[:],
                    None if node.values is None else node.values[:],
                    None if node.sizes is None else node.sizes[:])

    def build(self, leaf_kind: int, keys: list | None, values: list | None) -> Node:
        """A new tree holding `keys` (already in canonical order) and/or `values`, packed full."""
        total = len(keys if keys is not None else values)
        level = []
        for start in range(0, total, MAX_ENTRIES):
            stop = start + MAX_ENTRIES
            level.append(Node(leaf_kind, None if keys is None else keys[start:stop],
                              None if values is None else values[start:stop]))
        if not level:
            return empty(leaf_kind)
        while len(level) > 1:
            level = [self._branch_over(BRANCH_OF[leaf_kind], level[i:i + MAX_ENTRIES])
                     for i in range(0, len(level), MAX_ENTRIES)]
        return level[0]

    def _branch_over(self, kind: int, children: list[Node]) -> Node:
        separators = None if kind == LIST_BRANCH else [self._first_key(c) for c in children[1:]]
        return Node(kind, separators, children, [c.count() for c in children])

    def _first_key(self, slot: Node | int) -> Any:
        node = self.node(slot, DICT_LEAF)
        while node.sizes is not None:
            slot = node.values[0]
            node = self.node(slot, DICT_LEAF)
        return node.keys[0]

    def assign(self, root: Node | int, key: Any, value: Any, leaf_kind: int = DICT_LEAF) -> tuple[Node, bool]:
        """Set `key` (to `value` in a dict tree); return (new root, whether the key is new)."""
        node = self.mutable(root, leaf_kind)
        added = self._assign(node, key, value)
        return self._grow(node), added

    def _assign(self, node: Node, key: Any, value: Any) -> bool:
        if node.sizes is None:
            keys = node.keys
            i = bisect_left(keys, key)
            if i < len(keys) and keys[i] == key:
                if node.values is not None:
                    self._discard_value(node.values[i])
                    node.values[i] = value
                return False
            keys.insert(i, key)
            if node.values is not None:
                node.values.insert(i, value)
            return True
        i = bisect_right(node.keys, key)
        child = self.mutable(node.values[i], LEAF_OF[node.kind])
        added = self._assign(child, key, value)
        node.values[i] = child
        node.sizes[i] += added
        self._split_child(node, i)
        return added

    def remove(self, root: Node | int, key: Any, leaf_kind: int = DICT_LEAF) -> tuple[Node, Any]:
        """Delete `key`; return (new root, removed value). KeyError if absent."""
        node = self.mutable(root, leaf_kind)
        removed = self._remove(node, key)
        return self._shrink(node), removed

    def _remove(self, node: Node, key: Any) -> Any:
        if node.sizes is None:
            keys = node.keys
            i = bisect_left(keys, key)
            if i == len(keys) or keys[i] != key:
                raise KeyError(key)
            del keys[i]
            if node.values is None:
                return key
            self._discard_value(node.values[i])
            return node.values.pop(i)
        i = bisect_right(node.keys, key)
        child = self.mutable(node.values[i], LEAF_OF[node.kind])
        removed = self._remove(child, key)
        node.values[i] = child
        node.sizes[i] -= 1
        self._rebalance_child(node, i)
        return removed

    def _discard_value(self, value: Any) -> None:
        # Only one-atom values: a replaced tree's root node is counted by `mutable`
        # when the tree was changed in place (counting it here too would count it twice).
        if type(value) is Ref and value.ptr and value.kind not in TREE_KINDS and self.on_discard is not None:
            self.on_discard(value.ptr)


    # positional (list trees)

    def set_at(self, root: Node | int, index: int, value: Any) -> Node:
        node = self.mutable(root, LIST_LEAF)
        def replace(leaf: Node, i: int) -> None:
            self._discard_value(leaf.values[i])
            leaf.values[i] = value

        self._positional(node, index, replace, 0)
        return node

    def insert_at(self, root: Node | int, index: int, value: Any) -> Node:
        node = self.mutable(root, LIST_LEAF)
        self._positional(node, index, lambda leaf, i: leaf.values.insert(i, value), 1, inserting=True)
        return self._grow(node)

    def delete_at(self, root: Node | int, index: int) -> tuple[Node, Any]:
        node = self.mutable(root, LIST_LEAF)
        removed = []
        self._positional(node, index, lambda leaf, i: removed.append(leaf.values.pop(i)), -1)
        self._discard_value(removed[0])
        return self._shrink(node), removed[0]

    def _positional(self, node: Node, index: int, change: Callable[[Node, int], None], delta: int,
                    inserting: bool = False) -> None:
        node.ends = None
        if node.sizes is None:
            change(node, index)
            return
        sizes = node.sizes
        i = 0
        # an insert at a child's end goes into that child, so appends fill the last leaf
        while i < len(sizes) - 1 and (index > sizes[i] if inserting else index >= sizes[i]):
            index -= sizes[i]
            i += 1
        child = self.mutable(node.values[i], LIST_LEAF)
        self._positional(child, index, change, delta, inserting)
        node.values[i] = child
        sizes[i] += delta
        if delta > 0:
            self._split_child(node, i)
        elif delta < 0:
            self._rebalance_child(node, i)

    # structure upkeep

    def _split_child(self, parent: Node, i: int) -> None:
        child = parent.values[i]
        width = child.width()
        if width <= MAX_ENTRIES:
            return
        half = width // 2
        if child.sizes is None:
            right = Node(child.kind, None if child.keys is None else child.keys[half:],
                         None if child.values is None else child.values[half:])
            if child.keys is not None:
                del child.keys[half:]
            if child.values is not None:
                del child.values[half:]
            separator = None if right.keys is None else right.keys[0]
        else:
            separator = None if child.keys is None else child.keys[half - 1]
            right = Node(child.kind, None if child.keys is None else child.keys[half:],
                         child.values[half:], child.sizes[half:])
            if child.keys is not None:
                del child.keys[half - 1:]
            del child.values[half:]
            del child.sizes[half:]
        child.ends = right.ends = None
        parent.values.insert(i + 1, right)
        parent.sizes[i:i + 1] = [child.count(), right.count()]
        if parent.keys is not None:
            parent.keys.insert(i, separator)
        parent.ends = None

    def _rebalance_child(self, parent: Node, i: int) -> None:
        child = parent.values[i]
        width = child.width()
        if width >= MERGE_BELOW:
            return
        if width == 0:
            del parent.values[i]
            del parent.sizes[i]
            if parent.keys:
                del parent.keys[max(i - 1, 0)]
            parent.ends = None
            return
        j = i - 1 if i > 0 else i + 1
        if j >= len(parent.values):
            return
        left_i = min(i, j)
        left = self.mutable(parent.values[left_i], LEAF_OF[parent.kind])
        right = self.mutable(parent.values[left_i + 1], LEAF_OF[parent.kind])
        if left.width() + right.width() > MAX_ENTRIES:
            return
        if left.sizes is None:
            if left.keys is not None:
                left.keys.extend(right.keys)
            if left.values is not None:
                left.values.extend(right.values)
        else:
            if left.keys is not None:
                left.keys.append(parent.keys[left_i])
                left.keys.extend(right.keys)
            left.values.extend(right.values)
            left.sizes.extend(right.sizes)
        left.ends = None
        parent.values[left_i] = left
        del parent.values[left_i + 1]
        parent.sizes[left_i:left_i + 2] = [left.count()]
        if parent.keys is not None:
            del parent.keys[left_i]
        parent.ends = None

    def _grow(self, root: Node) -> Node:
        if root.width() <= MAX_ENTRIES:
            return root
        parent = Node(BRANCH_OF[LEAF_OF[root.kind]], None if root.kind in (LIST_LEAF, LIST_BRANCH) else [],
                      [root], [root.count()])
        self._split_child(parent, 0)
        return self._grow(parent)

    def _shrink(self, root: Node) -> Node:
        while root.sizes is not None and len(root.values) == 1:
            root = self.mutable(root.values[0], LEAF_OF[root.kind])
        if root.sizes is not None and not root.values:
            return empty(LEAF_OF[root.kind])
        return root

    # -- writing (coordinator) ----------------------------------------------

    def flush(self, node: Node | int, write_node: Callable[[Node], int], write_value: Callable[[Any], Any]) -> int:
        """Write every dirty node under `node` bottom-up; return the root's pointer.

        `write_node(node)` appends a node whose children are pointers and returns
        its pointer; `write_value(v)` turns a leaf value into a scalar or Ref.
        An empty tree is the null pointer 0.
        """
        if type(node) is not Node:
            return node
        if node.ptr is not None:
            return node.ptr
        if node.sizes is None and node.width() == 0:
            return 0
        if node.sizes is None:
            if node.values is not None:
                node.values = [write_value(v) for v in node.values]
        else:
            node.values = [self.flush(c, write_node, write_value) if type(c) is Node else c
                           for c in node.values]
        node.ptr = write_node(node)
        return node.ptr

    # -- checking -----------------------------------------------------------

    def check_tree(self, root: Node | int, leaf_kind: int, visit_value: Callable[[Any], None]) -> int:
        """Verify every invariant of the tree at `root`; return its entry count."""
        node = self.node(root, leaf_kind)
        depths: set[int] = set()
        count = self._check(node, leaf_kind, None, None, 0, depths, visit_value, is_root=True)
        if len(depths) > 1:
            raise CorruptionError(f"tree {_where(node)} has leaves at depths {sorted(depths)}")
        return count

    def _check(self, node: Node, leaf_kind: int, low: Any, high: Any, depth: int, depths: set,
               visit_value: Callable[[Any], None], is_root: bool = False) -> int:
        if LEAF_OF.get(node.kind) != leaf_kind:
            raise CorruptionError(f"node {_where(node)} of kind {node.kind} inside a tree of kind {leaf_kind}")
        if node.width() > MAX_ENTRIES or (node.width() == 0 and not is_root):
            raise CorruptionError(f"node {_where(node)} holds {node.width()} entries")
        if node.keys is not None:
            ordered = [order_key(k) for k in node.keys]
            if any(a >= b for a, b in zip(ordered, ordered[1:])):
                raise CorruptionError(f"keys of node {_where(node)} are not in strictly increasing order")
            if ordered and low is not None and ordered[0] < order_key(low):
                raise CorruptionError(f"node {_where(node)} holds a key below its separator")
            if ordered and high is not None and ordered[-1] >= order_key(high) and node.sizes is None:
                raise CorruptionError(f"node {_where(node)} holds a key at or above its separator")
        if node.sizes is None:
            depths.add(depth)
            for value in node.values or ():
                visit_value(value)
            return node.width()
        total = 0
        for i, child_slot in enumerate(node.values):
            child = self.node(child_slot, leaf_kind)
            child_low = low if i == 0 or node.keys is None else node.keys[i - 1]
            child_high = high if node.keys is None or i == len(node.keys) else node.keys[i]
            count = self._check(child, leaf_kind, child_low, child_high, depth + 1, depths, visit_value)
            if count != node.sizes[i]:
                raise CorruptionError(
                    f"branch {_where(node)} records {node.sizes[i]} entries under child {i}, found {count}")
            total += count
        return total


def _where(node: Node) -> str:
    return f"{node.ptr:#x}" if node.ptr is not None else "(unwritten)"

