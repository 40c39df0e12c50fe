"""Reading B+trees: lookups, positions, iteration, position ranges and counts.

Owns the read algorithms over clean and dirty nodes alike. Runs in every
process: clients read snapshots through it, the coordinator reads its working
copy through the same code (its `TreeWriter` extends `TreeAccess`).

Invariant: reading never changes a node's contents; the only writes are the
per-node memo `Node.ends` (cumulative sizes, a pure function of `sizes`), so
a clean node stays safe to share between every snapshot of a process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import accumulate, chain
from typing import Any

from protobase.core.arena import DICT_LEAF, LIST_LEAF
from protobase.core.btree.check import check_tree
from protobase.core.btree.node import Node, Slot, empty
from protobase.keyorder import bisect_left, bisect_right

__all__ = ["TreeAccess"]


class TreeAccess:
    """Tree algorithms over a node loader (the coordinator's `TreeWriter` also writes).

    `load(ptr)` returns the clean Node at a pointer (cached by the caller).
    Slots passed around are a Node or an int pointer (0 = empty tree).
    """

    def __init__(self, load: Callable[[int], Node]) -> None:
        self.load = load

    def node(self, slot: Slot, leaf_kind: int) -> Node:
        """The Node a slot stands for: itself, the loaded node, or a new empty one for 0."""
        if type(slot) is Node:
            return slot
        if slot == 0:
            return empty(leaf_kind)
        return self.load(slot)

    def lookup(self, root: Slot, key: Any, leaf_kind: int = DICT_LEAF) -> Any:
        """The value stored under `key` in a dict tree (for a set tree: the key); KeyError if absent."""
        node = self.node(root, leaf_kind)
        load = self.load
        while node.sizes is not None:
            separators, children = node.keys, node.values
            assert separators is not None and children is not None, "a dict or set branch"
            child = children[bisect_right(separators, key)]
            node = child if type(child) is Node else load(child)
        keys = node.keys
        assert keys is not None, "a dict or set leaf"
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            return node.values[i] if node.values is not None else keys[i]
        raise KeyError(key)

    def at(self, root: Slot, index: int) -> Any:
        """The value at position `index` (0 <= index < count) of a list tree."""
        node = self.node(root, LIST_LEAF)
        while node.sizes is not None:
            ends = node.ends
            if ends is None:
                ends = node.ends = list(accumulate(node.sizes))
            i = bisect_right(ends, index)
            if i:
                index -= ends[i - 1]
            children = node.values
            assert children is not None, "a branch has children"
            child = children[i]
            node = child if type(child) is Node else self.load(child)
        values = node.values
        assert values is not None, "a list leaf"
        return values[index]

    def count(self, root: Slot, leaf_kind: int) -> int:
        """Entries in the tree at `root`, summed from the root's subtree sizes (no descent)."""
        return self.node(root, leaf_kind).count()

    def leaves(self, root: Slot, leaf_kind: int, start: Any = None, reverse: bool = False) -> Iterator[Node]:
        """Leaves in order (or reverse); with `start`, from the leaf that may hold it."""
        node = self.node(root, leaf_kind)
        if node.sizes is None:
            if node.width():
                yield node
            return
        children = node.values
        assert children is not None, "a branch has children"
        order = range(len(children) - 1, -1, -1) if reverse else range(len(children))
        first = bisect_right(node.keys, start) if start is not None and node.keys is not None else None
        for i in order:
            if first is not None and not reverse and i < first:
                continue
            child = children[i]
            yield from self.leaves(
                child if type(child) is Node else self.load(child), leaf_kind, start if i == first else None, reverse
            )

    def keys_at(self, root: Slot, leaf_kind: int, start: int, stop: int) -> Iterator[Any]:
        """Keys at positions [start, stop) of a dict or set tree, found through subtree sizes."""
        for leaf, first, last in self._leaves_at(root, leaf_kind, start, stop):
            assert leaf.keys is not None, "a dict or set leaf"
            yield from leaf.keys[first:last]

    def values_at(self, root: Slot, leaf_kind: int, start: int, stop: int) -> Iterator[Any]:
        """Values at positions [start, stop) of a list (or dict) tree, leaf by leaf."""
        for leaf, first, last in self._leaves_at(root, leaf_kind, start, stop):
            assert leaf.values is not None, "a list or dict leaf"
            yield from leaf.values[first:last]

    def _leaves_at(self, root: Slot, leaf_kind: int, start: int, stop: int) -> Iterator[tuple[Node, int, int]]:
        """(leaf, first, last) for each leaf holding positions of [start, stop), in order."""
        node = self.node(root, leaf_kind)
        if node.sizes is None:
            yield node, start, stop
            return
        assert node.values is not None, "a branch has children"
        offset = 0
        for child, size in zip(node.values, node.sizes):
            if offset >= stop:
                return
            if offset + size > start:
                yield from self._leaves_at(child, leaf_kind, max(0, start - offset), stop - offset)
            offset += size

    def items(self, root: Slot, leaf_kind: int = DICT_LEAF) -> Iterator[tuple[Any, Any]]:
        """(key, stored value) pairs of a dict tree in key order.

        Chained leaf by leaf, so no Python frame resumes per pair: an index
        build walks a million (0.2 s through a generator).
        """
        return chain.from_iterable(map(_pairs, self.leaves(root, leaf_kind)))

    def keys(self, root: Slot, leaf_kind: int) -> Iterator[Any]:
        """Keys of a dict or set tree in order."""
        for leaf in self.leaves(root, leaf_kind):
            assert leaf.keys is not None, "a dict or set leaf"
            yield from leaf.keys

    def values(self, root: Slot, leaf_kind: int) -> Iterator[Any]:
        """Stored values of a dict or list tree in order."""
        for leaf in self.leaves(root, leaf_kind):
            assert leaf.values is not None, "a dict or list leaf"
            yield from leaf.values

    def check_tree(self, root: Slot, leaf_kind: int, visit_value: Callable[[Any], None]) -> int:
        """Verify every invariant of the tree at `root`; return its entry count (see check.py)."""
        return check_tree(self.node, root, leaf_kind, visit_value)


def _pairs(leaf: Node) -> Iterator[tuple[Any, Any]]:
    """The (key, value) pairs of a dict leaf."""
    assert leaf.keys is not None and leaf.values is not None, "a dict leaf"
    return zip(leaf.keys, leaf.values)
