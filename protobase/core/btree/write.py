"""Changing B+trees by path copying: insert, delete, split, merge, bulk build, flush.

Owns the write algorithms. Runs in the coordinator only (coordinator/writer.py
applies a commit's operations through a `TreeWriter`; recovery replays the
WAL through the same one).

A change copies the nodes on one root-to-leaf path and shares the rest, so
committing one key writes O(log n) atoms, never the whole collection.

Invariant: a clean node (one with a pointer) is never mutated: `mutable`
copies it into a dirty node first, and reports the copied atom through
`on_discard`. A dirty node belongs to the working copy of one commit only.
Every change leaves the tree satisfying check.py's invariants once the
working root is returned (splits and merges run on the way back up).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from protobase.core.arena import DICT_LEAF, LIST_BRANCH, LIST_LEAF
from protobase.core.btree.node import BRANCH_OF, LEAF_OF, MAX_ENTRIES, MERGE_BELOW, TREE_KINDS, Node, Slot, empty
from protobase.core.btree.read import TreeAccess
from protobase.core.codec import Ref
from protobase.keyorder import bisect_left, bisect_right

__all__ = ["TreeWriter"]


class TreeWriter(TreeAccess):
    """Reads and changes trees over a node loader (the coordinator's instance)."""

    def __init__(self, load: Callable[[int], Node], on_discard: Callable[[int], None] | None = None) -> None:
        super().__init__(load)
        # Told the pointer of every atom a change stops using (a copied node, a
        # replaced or removed Ref value); the coordinator counts reclaimable bytes.
        self.on_discard = on_discard

    # -- building -------------------------------------------------------------

    def mutable(self, slot: Slot, leaf_kind: int) -> Node:
        """A dirty node to change in place: the slot itself if dirty, else a copy."""
        node = self.node(slot, leaf_kind)
        if node.ptr is None and type(slot) is Node:
            return node
        self.discard_node(node)
        return Node(
            node.kind,
            None if node.keys is None else node.keys[:],
            None if node.values is None else node.values[:],
            None if node.sizes is None else node.sizes[:],
        )

    def discard_node(self, node: Node) -> None:
        """Report a node a change stops using (a clean one: a dirty node was never written)."""
        if node.ptr is not None and self.on_discard is not None:
            self.on_discard(node.ptr)

    def build(self, leaf_kind: int, keys: list[Any] | None, values: list[Any] | None) -> Node:
        """A new tree holding `keys` (already in canonical order) and/or `values`, packed full."""
        entries = keys if keys is not None else values
        assert entries is not None, "a tree is built from keys, values or both"
        level: list[Node] = []
        for start in range(0, len(entries), MAX_ENTRIES):
            stop = start + MAX_ENTRIES
            level.append(
                Node(
                    leaf_kind,
                    None if keys is None else keys[start:stop],
                    None if values is None else values[start:stop],
                )
            )
        if not level:
            return empty(leaf_kind)
        while len(level) > 1:
            level = [
                self._branch_over(BRANCH_OF[leaf_kind], level[i : i + MAX_ENTRIES])
                for i in range(0, len(level), MAX_ENTRIES)
            ]
        return level[0]

    def _branch_over(self, kind: int, children: list[Node]) -> Node:
        separators = None if kind == LIST_BRANCH else [self._first_key(c) for c in children[1:]]
        return Node(kind, separators, children, [c.count() for c in children])

    def _first_key(self, slot: Slot) -> Any:
        node = self.node(slot, DICT_LEAF)
        while node.sizes is not None:
            assert node.values is not None, "a branch has children"
            node = self.node(node.values[0], DICT_LEAF)
        assert node.keys is not None, "a dict or set leaf"
        return node.keys[0]

    # -- keyed trees (dict and set) ---------------------------------------------

    def assign(self, root: Slot, key: Any, value: Any, leaf_kind: int = DICT_LEAF) -> tuple[Node, bool]:
        """Set `key` (to `value` in a dict tree); return (new root, whether the key is new)."""
        node = self.mutable(root, leaf_kind)
        added = self._assign(node, key, value)
        return self._grow(node), added

    def _assign(self, node: Node, key: Any, value: Any) -> bool:
        if node.sizes is None:
            keys = node.keys
            assert keys is not None, "a dict or set leaf"
            i = bisect_left(keys, key)
            if i < len(keys) and keys[i] == key:
                if node.values is not None:
                    self.discard_value(node.values[i])
                    node.values[i] = value
                return False
            keys.insert(i, key)
            if node.values is not None:
                node.values.insert(i, value)
            return True
        assert node.keys is not None and node.values is not None, "a dict or set branch"
        i = bisect_right(node.keys, key)
        child = self.mutable(node.values[i], LEAF_OF[node.kind])
        added = self._assign(child, key, value)
        node.values[i] = child
        node.sizes[i] += added
        self._split_child(node, i)
        return added

    def remove(self, root: Slot, key: Any, leaf_kind: int = DICT_LEAF) -> tuple[Node, Any]:
        """Delete `key`; return (new root, removed value). KeyError if absent."""
        node = self.mutable(root, leaf_kind)
        removed = self._remove(node, key)
        return self._shrink(node), removed

    def _remove(self, node: Node, key: Any) -> Any:
        if node.sizes is None:
            keys = node.keys
            assert keys is not None, "a dict or set leaf"
            i = bisect_left(keys, key)
            if i == len(keys) or keys[i] != key:
                raise KeyError(key)
            del keys[i]
            if node.values is None:
                return key
            self.discard_value(node.values[i])
            return node.values.pop(i)
        assert node.keys is not None and node.values is not None, "a dict or set branch"
        i = bisect_right(node.keys, key)
        child = self.mutable(node.values[i], LEAF_OF[node.kind])
        removed = self._remove(child, key)
        node.values[i] = child
        node.sizes[i] -= 1
        self._rebalance_child(node, i)
        return removed

    def discard_value(self, value: Any) -> None:
        """Report a leaf value a change replaced or removed, if it was an atom of its own."""
        # Only one-atom values: a replaced tree's root node is counted by `mutable`
        # when the tree was changed in place (counting it here too would count it twice).
        if type(value) is Ref and value.ptr and value.kind not in TREE_KINDS and self.on_discard is not None:
            self.on_discard(value.ptr)

    # -- positional trees (list) ------------------------------------------------

    def set_at(self, root: Slot, index: int, value: Any) -> Node:
        """Replace the value at `index` (0 <= index < count) of a list tree; return the new root."""
        node = self.mutable(root, LIST_LEAF)

        def replace(leaf: Node, i: int) -> None:
            assert leaf.values is not None
            self.discard_value(leaf.values[i])
            leaf.values[i] = value

        self._positional(node, index, replace, 0)
        return node

    def insert_at(self, root: Slot, index: int, value: Any) -> Node:
        """Insert `value` before position `index` (0 <= index <= count) of a list tree; return the new root."""
        node = self.mutable(root, LIST_LEAF)

        def insert(leaf: Node, i: int) -> None:
            assert leaf.values is not None
            leaf.values.insert(i, value)

        self._positional(node, index, insert, 1, inserting=True)
        return self._grow(node)

    def delete_at(self, root: Slot, index: int) -> tuple[Node, Any]:
        """Delete position `index` (0 <= index < count) of a list tree; return (new root, removed value)."""
        node = self.mutable(root, LIST_LEAF)
        removed: list[Any] = []

        def delete(leaf: Node, i: int) -> None:
            assert leaf.values is not None
            removed.append(leaf.values.pop(i))

        self._positional(node, index, delete, -1)
        self.discard_value(removed[0])
        return self._shrink(node), removed[0]

    def _positional(
        self, node: Node, index: int, change: Callable[[Node, int], None], delta: int, inserting: bool = False
    ) -> None:
        """Apply `change(leaf, i)` at position `index` below `node`, adjusting sizes by `delta` on the way up."""
        node.ends = None
        if node.sizes is None:
            change(node, index)
            return
        assert node.values is not None, "a branch has children"
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

    # -- structure upkeep ---------------------------------------------------------

    def _split_child(self, parent: Node, i: int) -> None:
        """Split the dirty child `i` of `parent` in two halves if it is over MAX_ENTRIES."""
        assert parent.values is not None and parent.sizes is not None, "a branch"
        child: Node = parent.values[i]
        width = child.width()
        if width <= MAX_ENTRIES:
            return
        half = width // 2
        separator: Any
        if child.sizes is None:
            right = Node(
                child.kind,
                None if child.keys is None else child.keys[half:],
                None if child.values is None else child.values[half:],
            )
            if child.keys is not None:
                del child.keys[half:]
            if child.values is not None:
                del child.values[half:]
            separator = None if right.keys is None else right.keys[0]
        else:
            assert child.values is not None, "a branch has children"
            separator = None if child.keys is None else child.keys[half - 1]
            right = Node(
                child.kind, None if child.keys is None else child.keys[half:], child.values[half:], child.sizes[half:]
            )
            if child.keys is not None:
                del child.keys[half - 1 :]
            del child.values[half:]
            del child.sizes[half:]
        child.ends = right.ends = None
        parent.values.insert(i + 1, right)
        parent.sizes[i : i + 1] = [child.count(), right.count()]
        if parent.keys is not None:
            parent.keys.insert(i, separator)
        parent.ends = None

    def _rebalance_child(self, parent: Node, i: int) -> None:
        """Drop child `i` of `parent` if empty, or merge it with a neighbour if under MERGE_BELOW and they fit."""
        assert parent.values is not None and parent.sizes is not None, "a branch"
        width = parent.values[i].width()
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
        self._merge(left, right, None if parent.keys is None else parent.keys[left_i])
        parent.values[left_i] = left
        del parent.values[left_i + 1]
        parent.sizes[left_i : left_i + 2] = [left.count()]
        if parent.keys is not None:
            del parent.keys[left_i]
        parent.ends = None

    @staticmethod
    def _merge(left: Node, right: Node, separator: Any) -> None:
        """Append dirty sibling `right` to dirty `left`; `separator` is the parent's key between them."""
        if left.sizes is None:
            if left.keys is not None:
                assert right.keys is not None, "siblings share a kind"
                left.keys.extend(right.keys)
            if left.values is not None:
                assert right.values is not None, "siblings share a kind"
                left.values.extend(right.values)
        else:
            assert left.values is not None and right.values is not None and right.sizes is not None, "branches"
            if left.keys is not None:
                assert right.keys is not None, "siblings share a kind"
                left.keys.append(separator)
                left.keys.extend(right.keys)
            left.values.extend(right.values)
            left.sizes.extend(right.sizes)
        left.ends = None

    def _grow(self, root: Node) -> Node:
        """A root over MAX_ENTRIES split under a new branch, as often as needed."""
        if root.width() <= MAX_ENTRIES:
            return root
        parent = Node(
            BRANCH_OF[LEAF_OF[root.kind]], None if root.kind in (LIST_LEAF, LIST_BRANCH) else [], [root], [root.count()]
        )
        self._split_child(parent, 0)
        return self._grow(parent)

    def _shrink(self, root: Node) -> Node:
        """A root with one child replaced by that child, as often as needed; a childless one by an empty leaf."""
        while root.sizes is not None:
            children = root.values
            assert children is not None, "a branch has children"
            if len(children) != 1:
                break
            root = self.mutable(children[0], LEAF_OF[root.kind])
        if root.sizes is not None and not root.values:
            return empty(LEAF_OF[root.kind])
        return root

    # -- writing ------------------------------------------------------------------

    def flush(
        self,
        node: Slot,
        write_node: Callable[[Node], int],
        write_value: Callable[[Any], Any],
        stored: frozenset[type] = frozenset(),
        write_leaf: Callable[[list[Any]], list[Any]] | None = None,
    ) -> int:
        """Write every dirty node under `node` bottom-up; return the root's pointer.

        `write_node(node)` appends a node whose children are pointers and returns
        its pointer; `write_value(v)` turns a leaf value into a scalar or Ref,
        and is not called for values of the `stored` types, which are already
        in their stored form (a copied leaf holds one new value among 63 Refs).
        `write_leaf(values)`, when given, does that for a whole leaf's values
        at once instead (the coordinator writes a leaf's records in one copy).
        An empty tree is the null pointer 0.
        """
        if type(node) is not Node:
            return node
        if node.ptr is not None:
            return node.ptr
        if node.sizes is None and node.width() == 0:
            return 0
        if node.sizes is None:
            if node.values is not None and write_leaf is not None:
                node.values = write_leaf(node.values)
            elif node.values is not None:
                node.values = [v if type(v) in stored else write_value(v) for v in node.values]
        else:
            assert node.values is not None, "a branch has children"
            node.values = [
                self.flush(c, write_node, write_value, stored, write_leaf) if type(c) is Node else c
                for c in node.values
            ]
        node.ptr = write_node(node)
        return node.ptr
