"""`db.check()`: verify every structural invariant reachable from a snapshot.

Walks the whole tree of atoms from the root: every pointer lands on a valid
atom header inside a mapped segment of this instance, every node has its
shape and its tree's invariants (core/btree/check.py), every value decodes. Also checks
the reader table against the snapshot: no reader holds a snapshot newer than
the latest commit. Any failure raises CorruptionError naming what is wrong.
Runs in the client process that calls `db.check()`, on a snapshot it pinned.
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
    from protobase.core.store import Store

__all__ = ["check_database", "AtomWalk"]


def check_database(session: Session, snapshot: Snapshot) -> int:
    """Check everything reachable from `snapshot` (pinned in `session`); return the number of atoms visited."""
    control = session.control
    walk = AtomWalk(session.store, control.oldest_segment)
    root_ptr = snapshot.root.ptr
    if root_ptr:
        walk.tree(root_ptr, LEAF_OF[session.store.reader.atom(root_ptr)[0]])
    for reader in control.readers():
        if reader.snapshot_seq is not None and reader.snapshot_seq > control.read_root()[0]:
            raise CorruptionError(
                f"reader slot {reader.slot} (pid {reader.pid}) holds snapshot "
                f"{reader.snapshot_seq}, newer than the latest commit"
            )
    return walk.visited


class AtomWalk:
    """One walk over the atoms reachable from a root, counting them; raises at the first broken invariant."""

    def __init__(self, store: Store, oldest_segment: int) -> None:
        self.store = store
        self.oldest = oldest_segment  # pointers below it name reclaimed memory
        self.visited = 0  # atoms visited so far

    def visit(self, slot: Any) -> None:
        """Check what a leaf slot or a decoded value's reference points to (scalars need nothing)."""
        if type(slot) is not Ref:
            return
        if slot.ptr and segment_of(slot.ptr) < self.oldest:
            raise CorruptionError(
                f"pointer {slot.ptr:#x} points into segment {segment_of(slot.ptr)}, "
                f"which was reclaimed (oldest live segment is {self.oldest})"
            )
        self.visited += 1
        if slot.kind in TREE_KINDS:
            if slot.ptr:
                self.tree(slot.ptr, LEAF_OF[slot.kind])
            return
        if slot.kind == INDEXED:
            self.indexed(slot.ptr)
            return
        if slot.kind != VALUE:
            raise CorruptionError(f"reference {slot.ptr:#x} has unknown kind {slot.kind}")
        kind, payload = self.store.reader.atom(slot.ptr)
        if kind != VALUE:
            raise CorruptionError(f"reference {slot.ptr:#x} expects a value atom, found kind {kind}")
        codec.decode(payload, frozen=False, opaque_dataclasses=True, ref=lambda ptr, k: self.visit(Ref(ptr, k)))

    def tree(self, ptr: int, leaf_kind: int) -> None:
        self.store.access.check_tree(ptr, leaf_kind, self.visit)

    def indexed(self, ptr: int) -> None:
        """An indexed collection: its records' tree, each index's tree, and that they agree."""
        kind, payload = self.store.reader.atom(ptr)
        if kind != INDEXED:
            raise CorruptionError(f"reference {ptr:#x} expects an indexed collection, found kind {kind}")
        collection = self.store.value(Ref(ptr, INDEXED))
        if collection.ptr:
            self.tree(collection.ptr, DICT_LEAF)
        for field, index_ptr in collection.index_pointers.items():
            if index_ptr:
                self.tree(index_ptr, SET_LEAF)
            self.index_contents(collection, field, index_ptr)

    def index_contents(self, collection: Any, field: str, index_ptr: int) -> None:
        expected = {
            (kind, value, key) for key, record in collection.items() for kind, value in index_entries(record, field)
        }
        found = set(self.store.access.keys(index_ptr, SET_LEAF)) if index_ptr else set()
        if found != expected:
            missing, extra = expected - found, found - expected
            raise CorruptionError(
                f"index on {field!r} of collection {collection.ptr:#x} disagrees with its records: "
                f"{len(missing)} entries missing (e.g. {sorted(missing, key=repr)[:3]}), "
                f"{len(extra)} extra (e.g. {sorted(extra, key=repr)[:3]})"
            )
