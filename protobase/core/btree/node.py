"""B+tree nodes: the node type, its byte format, and the tree kinds.

Owns the node format. Every process decodes nodes (clients for snapshots,
the coordinator for its own reads); only the coordinator encodes them, when
it writes a commit's dirty nodes.

Three shapes share one node type:

* dict trees (DICT_LEAF / DICT_BRANCH): keys in canonical order (keyorder.py),
  leaves hold values: scalars inline, containers as a Ref to their own atom;
* set trees (SET_LEAF / SET_BRANCH): keys only;
* list trees (LIST_LEAF / LIST_BRANCH): no keys, positions found through
  each branch's subtree sizes (a counted B-tree).

A node is one atom (arena.py); the atom header gives its kind, the payload is
a msgpack array (codec.py encodes the keys, values and Refs in it):

    DICT_LEAF    [keys, values]
    SET_LEAF     [keys]
    LIST_LEAF    [values]
    DICT_BRANCH  [separators, child pointers, subtree sizes]   len(separators) == children - 1
    SET_BRANCH   [separators, child pointers, subtree sizes]   separator i = smallest key of child i+1
    LIST_BRANCH  [child pointers, subtree sizes]

Child pointers are AtomPointers (ints); subtree sizes are entry counts. An
empty tree is no atom at all: the null pointer 0.

Invariant: a `Node` with `ptr is None` is dirty: the coordinator built it
during the current commit, may mutate it in place, and writes it with
`TreeWriter.flush`. A node with a pointer is clean and never mutated again,
so one decoded node can be cached and shared by every snapshot of a process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias, final

from protobase.core import codec
from protobase.core.arena import DICT_BRANCH, DICT_LEAF, LIST_BRANCH, LIST_LEAF, SET_BRANCH, SET_LEAF
from protobase.errors import CorruptionError

__all__ = [
    "Node",
    "MAX_ENTRIES",
    "MERGE_BELOW",
    "BRANCH_OF",
    "LEAF_OF",
    "BRANCHES",
    "TREE_KINDS",
    "Slot",
    "empty",
    "decode_node",
    "encode_node",
]

MAX_ENTRIES = 64  # entries per leaf, children per branch
MERGE_BELOW = MAX_ENTRIES // 4  # a node this small is merged into a neighbour

BRANCH_OF = {DICT_LEAF: DICT_BRANCH, SET_LEAF: SET_BRANCH, LIST_LEAF: LIST_BRANCH}  # {leaf kind -> branch kind}
LEAF_OF = {
    DICT_BRANCH: DICT_LEAF,
    SET_BRANCH: SET_LEAF,
    LIST_BRANCH: LIST_LEAF,
    DICT_LEAF: DICT_LEAF,
    SET_LEAF: SET_LEAF,
    LIST_LEAF: LIST_LEAF,
}  # {any tree kind -> its leaf kind}
BRANCHES = frozenset(BRANCH_OF.values())
TREE_KINDS = frozenset(BRANCH_OF) | BRANCHES


@final  # so `type(slot) is Node` narrows a Slot to int in its else branch
class Node:
    """One decoded tree node; clean when `ptr` is set, dirty (being built) when None."""

    __slots__ = ("kind", "keys", "values", "sizes", "ptr", "ends", "order_keys")

    def __init__(
        self,
        kind: int,
        keys: list[Any] | None,
        values: list[Any] | None,
        sizes: list[int] | None = None,
        ptr: int | None = None,
    ) -> None:
        self.kind = kind
        self.keys = keys  # sorted keys (dict/set leaves), separators (dict/set branches), or None
        # Leaf values (scalars and Refs once written, any user value while dirty), or
        # branch children (a Slot each: int pointer, or a dirty Node); None in set leaves.
        self.values = values
        self.sizes = sizes  # branches: entry count of each child's subtree; leaves: None
        self.ptr = ptr  # AtomPointer once written
        self.ends: list[int] | None = None  # list branches: cumulative sizes, computed on first positional lookup
        # clean nodes: order_key of each key, computed on first range search (index.py)
        self.order_keys: list[tuple[Any, ...]] | None = None

    @property
    def is_branch(self) -> bool:
        return self.sizes is not None

    def count(self) -> int:
        """Entries in the subtree under this node."""
        if self.sizes is not None:
            return sum(self.sizes)
        entries = self.keys if self.values is None else self.values
        assert entries is not None, "a leaf holds keys or values"
        return len(entries)

    def width(self) -> int:
        """Entries in a leaf, children in a branch."""
        entries = self.values if self.values is not None else self.keys
        assert entries is not None, "a node holds keys or values"
        return len(entries)


Slot: TypeAlias = Node | int  # a tree as its callers pass it: a Node, or the pointer of a clean one (0: the empty tree)


def empty(leaf_kind: int) -> Node:
    """A new, empty, dirty tree root."""
    return Node(leaf_kind, None if leaf_kind == LIST_LEAF else [], None if leaf_kind == SET_LEAF else [])


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


def encode_node(node: Node, encode_keys: Callable[[list[Any]], bytes] | None = None) -> bytes:
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
