"""Persistent B+trees of atoms: large dicts, sets and lists.

Clients read trees through `TreeAccess`; the coordinator changes them by path
copying through `TreeWriter`: a change copies the nodes on one root-to-leaf
path and shares the rest, so committing one key writes O(log n) atoms, never
the whole collection.

Modules, bottom-up: `node` (the Node type, the node byte format, the tree
kinds), `check` (the tree invariants, verified), `read` (lookups, positions,
iteration, counts; every process), `write` (insert, delete, split, merge,
build, flush; the coordinator only), `build` (many sorted entries merged
into a tree bottom-up, for bulk loads; the coordinator only). This package
re-exports their public names, so callers import from `protobase.core.btree`.
"""

from protobase.core.btree.build import merge_entries, sorted_keys
from protobase.core.btree.check import check_tree
from protobase.core.btree.node import (
    BRANCH_OF,
    BRANCHES,
    LEAF_OF,
    MAX_ENTRIES,
    MERGE_BELOW,
    TREE_KINDS,
    Node,
    Slot,
    decode_node,
    empty,
    encode_node,
)
from protobase.core.btree.read import TreeAccess
from protobase.core.btree.write import TreeWriter

__all__ = [
    "BRANCHES",
    "BRANCH_OF",
    "LEAF_OF",
    "MAX_ENTRIES",
    "MERGE_BELOW",
    "TREE_KINDS",
    "Node",
    "Slot",
    "TreeAccess",
    "TreeWriter",
    "check_tree",
    "decode_node",
    "empty",
    "encode_node",
    "merge_entries",
    "sorted_keys",
]
