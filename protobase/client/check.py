"""`db.check()`: verify every structural invariant reachable from a snapshot.

Walks the whole tree of atoms from the root: every pointer lands on a valid
atom header inside a mapped segment of this instance, every node has its
shape and its tree's invariants (btree.py), every value decodes. Also checks
the reader table against the snapshot: no reader holds a snapshot newer than
the latest commit. Any failure raises CorruptionError naming what is wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protobase.core import codec
from protobase.core.arena import DICT_LEAF, INDEXED, SET_LEAF, VALUE, segment_of
from protobase.core.btree import LEAF_OF, TREE_KINDS
from protobase.core.codec import Ref
from protobase.core.index import index_entries
from protobase.errors import CorruptionError

if TYPE_CHECKING:
    from protobase.client.session import Session
    from protobase.client.snapshot import Snapshot

__all__ = ["check_database"]


def check_database(session: Session, snapshot: Snapshot) -> int:
    """Check everything reachable from `snapshot` (pinned in `session`); return the number of atoms visited."""
    store = session.store
    control = session.control
    oldest = control.oldest_segment
    visited = 0

    def visit(slot: Any) -> None:
        nonlocal visited
        if type(slot) is not Ref:
            return
        if slot.ptr and segment_of(slot.ptr) < oldest:
            raise CorruptionError(f"pointer {slot.ptr:#x} points into segment {segment_of(slot.ptr)}, "
                                  f"which was reclaimed (oldest live segment is {oldest})")
        visited += 1
        if slot.kind in TREE_KINDS:
            if slot.ptr:
                check_tree(slot.ptr, LEAF_OF[slot.kind])
            return
        if slot.kind == INDEXED:
            check_indexed(slot.ptr)
            return
        if slot.kind != VALUE:
            raise CorruptionError(f"reference {slot.ptr:#x} has unknown kind {slot.kind}")
        kind, payload = store.reader.atom(slot.ptr)
        if kind != VALUE:
            raise CorruptionError(f"reference {slot.ptr:#x} expects a value atom, found kind {kind}")
        codec.decode(payload, frozen=False, opaque_dataclasses=True, ref=lambda ptr, k: visit(Ref(ptr, k)))


    def check_tree(ptr: int, leaf_kind: int) -> None:
        store.access.check_tree(ptr, leaf_kind, visit)

    def check_indexed(ptr: int) -> None:
        kind, payload = store.reader.atom(ptr)
        if kind != INDEXED:
            raise CorruptionError(f"reference {ptr:#x} expects an indexed collection, found kind {kind}")
        collection = store.value(Ref(ptr, INDEXED))
        if collection.ptr:
            check_tree(collection.ptr, DICT_LEAF)
        for field, index_ptr in collection.index_pointers.items():
            if index_ptr:
                check_tree(index_ptr, SET_LEAF)
            check_index_contents(collection, field, index_ptr)

    def check_index_contents(collection: Any, field: str, index_ptr: int) -> None:
        expected = {(kind, value, key) for key, record in collection.items()
                    for kind, value in index_entries(record, field)}
        found = set(store.access.keys(index_ptr, SET_LEAF)) if index_ptr else set()
        if found != expected:
            missing, extra = expected - found, found - expected
            raise CorruptionError(
                f"index on {field!r} of collection {collection.ptr:#x} disagrees with its records: "
                f"{len(missing)} entries missing (e.g. {sorted(missing, key=repr)[:3]}), "
                f"{len(extra)} extra (e.g. {sorted(extra, key=repr)[:3]})")


    root_ptr = snapshot.root.ptr
    if root_ptr:
        check_tree(root_ptr, LEAF_OF[store.reader.atom(root_ptr)[0]])
    for reader in control.readers():
        if reader.snapshot_seq is not None and reader.snapshot_seq > control.read_root()[0]:
            raise CorruptionError(f"reader slot {reader.slot} (pid {reader.pid}) holds snapshot "
                                  f"{reader.snapshot_seq}, newer than the latest commit")
    return visited
