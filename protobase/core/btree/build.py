"""Bulk changes to B+trees, built bottom-up: many sorted entries merged into a tree in one pass.

Owns the bulk algorithms. Runs in the coordinator only (coordinator/writer.py,
for a commit's large SETs, merges and index builds; recovery replays the WAL
through the same writer).

Path copying one key at a time costs a root-to-leaf copy per key, and a bulk
load of n keys copies and re-encodes the same nodes n / 64 times each. Here
the new entries, sorted once, go down the tree together: each branch routes
every child the run of entries that falls in its key range (one bisect per
separator), children that receive none are shared untouched, and only the
leaves that receive entries are rebuilt. A rebuilt leaf holds its old and new
entries cut into as few leaves as can hold them, of even sizes (a fresh load
fills every leaf to `MAX_ENTRIES`); a branch whose children multiplied is cut
the same way, and whatever the root's level became is stacked under new
branches until one node is left. Every new node is dirty, built once, and
written once by `TreeWriter.flush`.

Invariant: given a tree that satisfies check.py's invariants and new keys
that are unique and in canonical order, the result satisfies them too (all
leaves at one depth, no node over `MAX_ENTRIES`, none empty, separators
bounding their children, sizes counting them), and holds exactly what
assigning the keys one by one, in order, would hold. Clean nodes are never
mutated; each clean node a merge stops using is reported to `on_discard`,
each replaced value to `discard_value`, as path copying reports them.
"""

from __future__ import annotations

import bisect
from typing import Any

from protobase.core.btree.node import BRANCH_OF, MAX_ENTRIES, Node, Slot
from protobase.core.btree.write import TreeWriter
from protobase.keyorder import order_key

__all__ = ["merge_entries", "sorted_keys"]

# A child's replacement: (the separator before it, or None to keep the one its parent had, the node).
Part = tuple[Any, Node]


def sorted_keys(keys: Any) -> list[Any]:
    """`keys` in canonical order (keyorder.py): natively when they compare, else by order key."""
    try:
        return sorted(keys)  # one family compares natively: the canonical order
    except TypeError:
        return sorted(keys, key=order_key)


def merge_entries(
    writer: TreeWriter, root: Slot, keys: list[Any], values: list[Any] | None, leaf_kind: int
) -> tuple[Node, list[tuple[Any, Any]]]:
    """Assign every key of `keys` (sorted canonically, unique) to the tree at `root`, bottom-up.

    `values` are the dict tree's new values, parallel to `keys` (None for a
    set tree). Returns the new working root and, for the keys that were
    already there, `(key, the value it replaced)`: the tree keeps the key
    object it had, as `TreeWriter.assign` does. An empty `keys` is refused.
    """
    assert keys, "a merge brings at least one entry"
    replaced: list[tuple[Any, Any]] = []
    level = _merge(writer, writer.node(root, leaf_kind), keys, values, 0, len(keys), replaced)
    while len(level) > 1:
        level = _cut_branches(BRANCH_OF[leaf_kind], [(lead, node, node.count()) for lead, node in level])
    return level[0][1], replaced


def _merge(
    writer: TreeWriter,
    node: Node,
    keys: list[Any],
    values: list[Any] | None,
    low: int,
    high: int,
    replaced: list[tuple[Any, Any]],
) -> list[Part]:
    """The nodes, at `node`'s level, holding `node`'s entries and keys[low:high]."""
    writer.discard_node(node)
    if node.sizes is None:
        return _merge_leaf(writer, node, keys, values, low, high, replaced)
    assert node.keys is not None and node.values is not None, "a dict or set branch"
    separators, children, sizes = node.keys, node.values, node.sizes
    out: list[tuple[Any, Slot, int]] = []  # (separator before it or None, child, its entry count)
    start = low
    for i, child in enumerate(children):
        stop = high if i == len(separators) else _bisect_left(keys, separators[i], start, high)
        lead = separators[i - 1] if i else None
        if stop == start:
            out.append((lead, child, sizes[i]))
            continue
        parts = _merge(writer, writer.node(child, node.kind), keys, values, start, stop, replaced)
        for j, (part_lead, part) in enumerate(parts):
            out.append((lead if j == 0 else part_lead, part, part.count()))
        start = stop
    return _cut_branches(node.kind, out)


def _merge_leaf(
    writer: TreeWriter,
    leaf: Node,
    keys: list[Any],
    values: list[Any] | None,
    low: int,
    high: int,
    replaced: list[tuple[Any, Any]],
) -> list[Part]:
    old_keys = leaf.keys
    assert old_keys is not None, "a dict or set leaf"
    new_keys = keys[low:high]
    new_values = None if values is None else values[low:high]
    if not old_keys:
        return _cut_leaves(leaf.kind, new_keys, new_values)
    if len(new_keys) <= len(old_keys):  # a few into many: insert them (C-speed moves)
        merged_keys = old_keys[:]
        merged_values = None if leaf.values is None else leaf.values[:]
        position = 0
        for index, key in enumerate(new_keys):
            position = _bisect_left(merged_keys, key, position, len(merged_keys))
            if position < len(merged_keys) and merged_keys[position] == key:
                if merged_values is not None and new_values is not None:
                    replaced.append((merged_keys[position], merged_values[position]))
                    writer.discard_value(merged_values[position])
                    merged_values[position] = new_values[index]
                continue
            merged_keys.insert(position, key)
            if merged_values is not None and new_values is not None:
                merged_values.insert(position, new_values[index])
        return _cut_leaves(leaf.kind, merged_keys, merged_values)
    # Many into few: one dict of both (equal keys are one dict key, as they are one tree key;
    # the old key object stays), sorted once (two sorted runs: timsort merges them).
    if leaf.values is None or new_values is None:
        merged = dict.fromkeys(old_keys)
        merged.update(dict.fromkeys(new_keys))
        return _cut_leaves(leaf.kind, sorted_keys(merged), None)
    merged = dict(zip(old_keys, leaf.values))
    for key, value in zip(new_keys, new_values):
        if key in merged:
            old = merged[key]
            replaced.append((key, old))
            writer.discard_value(old)
        merged[key] = value
    merged_keys = sorted_keys(merged)
    return _cut_leaves(leaf.kind, merged_keys, [merged[key] for key in merged_keys])


def _bisect_left(keys: list[Any], key: Any, low: int, high: int) -> int:
    """bisect_left over keys[low:high] in canonical order (keyorder.bisect_left, bounded)."""
    try:
        return bisect.bisect_left(keys, key, low, high)
    except TypeError:
        return bisect.bisect_left(keys, order_key(key), low, high, key=order_key)


def _pieces(count: int) -> int:
    """How many nodes `count` entries need: as few as hold them, so each is at least half full."""
    return -(-count // MAX_ENTRIES)


def _cut_leaves(kind: int, keys: list[Any] | None, values: list[Any] | None) -> list[Part]:
    """Leaves of even sizes holding `keys` and/or `values` (each part led by its first key)."""
    entries = keys if keys is not None else values
    assert entries is not None, "a leaf holds keys, values or both"
    count = len(entries)
    pieces = _pieces(count)
    parts: list[Part] = []
    for piece in range(pieces):
        start, stop = piece * count // pieces, (piece + 1) * count // pieces
        part_keys = None if keys is None else keys[start:stop]
        part = Node(kind, part_keys, None if values is None else values[start:stop])
        parts.append((None if part_keys is None or not piece else part_keys[0], part))
    return parts


def _cut_branches(kind: int, children: list[tuple[Any, Slot, int]]) -> list[Part]:
    """Dict or set branches of even widths over `children`: (separator before each or None, slot, entry count)."""
    count = len(children)
    pieces = _pieces(count)
    parts: list[Part] = []
    for piece in range(pieces):
        run = children[piece * count // pieces : (piece + 1) * count // pieces]
        separators = [lead for lead, _, _ in run[1:]]
        branch = Node(kind, separators, [slot for _, slot, _ in run], [size for _, _, size in run])
        parts.append((run[0][0] if piece else None, branch))
    return parts
