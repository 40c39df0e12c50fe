"""B+tree invariant checks, for `db.check()` and the tests.

Owns the statement of every tree invariant and the code that verifies it.
Runs in any process that reads the tree (clients through `db.check()`, tests
after every change); it only reads.

The invariants: keys strictly increasing across the tree (canonical order,
keyorder.py), every separator bounds its children (a child's keys are at or
above the separator before it and below the one after it), branch sizes
equal the entry counts below them, all leaves at one depth, no empty node
but an empty root, no node over `MAX_ENTRIES`, every node of the tree's kind.
A broken one raises CorruptionError naming the node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

from protobase.core.btree.node import LEAF_OF, MAX_ENTRIES, Node, Slot
from protobase.errors import CorruptionError
from protobase.keyorder import order_key

__all__ = ["check_tree"]

NodeOf: TypeAlias = Callable[[Slot, int], Node]  # (slot, leaf kind) -> Node, as TreeAccess.node


def check_tree(node_of: NodeOf, root: Slot, leaf_kind: int, visit_value: Callable[[Any], None]) -> int:
    """Verify every invariant of the tree at `root`; return its entry count.

    `node_of(slot, leaf_kind)` turns a slot into its Node (`TreeAccess.node`);
    `visit_value(v)` is called with every leaf value, so the caller can
    check what they point to. Raises CorruptionError at the first broken
    invariant.
    """
    node = node_of(root, leaf_kind)
    depths: set[int] = set()
    count = _check(node_of, node, leaf_kind, None, None, 0, depths, visit_value, is_root=True)
    if len(depths) > 1:
        raise CorruptionError(f"tree {_where(node)} has leaves at depths {sorted(depths)}")
    return count


def _check(
    node_of: NodeOf,
    node: Node,
    leaf_kind: int,
    low: Any,
    high: Any,
    depth: int,
    depths: set[int],
    visit_value: Callable[[Any], None],
    is_root: bool = False,
) -> int:
    """Check `node` and its subtree, whose keys must lie in [low, high); return its entry count."""
    if LEAF_OF.get(node.kind) != leaf_kind:
        raise CorruptionError(f"node {_where(node)} of kind {node.kind} inside a tree of kind {leaf_kind}")
    if node.width() > MAX_ENTRIES or (node.width() == 0 and not is_root):
        raise CorruptionError(f"node {_where(node)} holds {node.width()} entries")
    if node.keys is not None:
        _check_keys(node, low, high)
    if node.sizes is None:
        depths.add(depth)
        for value in node.values or ():
            visit_value(value)
        return node.width()
    assert node.values is not None, "a branch has children"
    total = 0
    for i, child_slot in enumerate(node.values):
        child = node_of(child_slot, leaf_kind)
        child_low = low if i == 0 or node.keys is None else node.keys[i - 1]
        child_high = high if node.keys is None or i == len(node.keys) else node.keys[i]
        count = _check(node_of, child, leaf_kind, child_low, child_high, depth + 1, depths, visit_value)
        if count != node.sizes[i]:
            raise CorruptionError(
                f"branch {_where(node)} records {node.sizes[i]} entries under child {i}, found {count}"
            )
        total += count
    return total


def _check_keys(node: Node, low: Any, high: Any) -> None:
    """A node's keys increase strictly and lie within its separators."""
    assert node.keys is not None
    ordered = [order_key(k) for k in node.keys]
    if any(a >= b for a, b in zip(ordered, ordered[1:])):
        raise CorruptionError(f"keys of node {_where(node)} are not in strictly increasing order")
    if ordered and low is not None and ordered[0] < order_key(low):
        raise CorruptionError(f"node {_where(node)} holds a key below its separator")
    if ordered and high is not None and ordered[-1] >= order_key(high) and node.sizes is None:
        raise CorruptionError(f"node {_where(node)} holds a key at or above its separator")


def _where(node: Node) -> str:
    return f"{node.ptr:#x}" if node.ptr is not None else "(unwritten)"
