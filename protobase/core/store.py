"""Reading atoms as Python objects, through the per-process caches.

A `Store` belongs to one process and one coordinator instance. It turns a
pointer into a node, a frozen value or a read-only tree view, decoding each
atom at most once while it stays cached. Used by workers for snapshots and
transactions, and by the coordinator (with its own writable mappings).

Invariant: everything a Store hands out is immutable (frozen values, clean
nodes, read-only views), so one cached object serves every snapshot of the
process safely.
"""

from __future__ import annotations

from typing import Any

from protobase.core import codec
from protobase.core.arena import DICT_LEAF, INDEXED, VALUE, AtomReader
from protobase.core.btree import LEAF_OF, Node, TreeAccess, decode_node
from protobase.core.cache import AtomBytesCache, AtomObjectCache
from protobase.core.codec import Ref
from protobase.core.views import VIEW_OF_LEAF_KIND, IndexedTreeDict
from protobase.settings import DEFAULTS

__all__ = ["Store"]

# Entries (protobase/settings.py): ~150 MB of small decoded records at most; raise with cache_size=.
DEFAULT_OBJECT_CACHE = DEFAULTS.object_cache
DEFAULT_BYTES_CACHE = DEFAULTS.bytes_cache


class Store:
    """Pointer -> object for one process, with write-through caches."""

    def __init__(
        self, reader: AtomReader, *, object_cache: int = DEFAULT_OBJECT_CACHE, bytes_cache: int = DEFAULT_BYTES_CACHE
    ) -> None:
        self.reader = reader
        self.objects = AtomObjectCache(object_cache)
        self.bytes = AtomBytesCache(bytes_cache)
        self.access = TreeAccess(self.node)
        self._ref_hook = self._ref  # one bound method, so the codec's decoder cache hits

    def atom(self, ptr: int) -> tuple[int, memoryview]:
        """(kind, payload view) of the atom at `ptr`, its header checked once while cached."""
        cached = self.bytes.get(ptr)
        if cached is None:
            cached = self.bytes.put(ptr, self.reader.atom(ptr))
        return cached

    def node(self, ptr: int) -> Node:
        """The clean Node at `ptr`, decoded once while cached (`TreeAccess` loads through this)."""
        node: Node | None = self.objects.get(ptr)
        if node is None:
            kind, payload = self.atom(ptr)
            node = self.objects.put(ptr, decode_node(kind, payload, ptr))
        return node

    def value(self, ref: Ref) -> Any:
        """The read-only object a Ref stands for: a frozen value or a tree view."""
        if ref.kind == VALUE:
            value = self.objects.get(ref.ptr)
            if value is None:
                kind, payload = self.atom(ref.ptr)
                value = self.objects.put(ref.ptr, codec.decode(payload, frozen=True, ref=self._ref_hook))
            return value
        if ref.kind == INDEXED:
            view = self.objects.get(ref.ptr)
            if view is None:
                fields = codec.decode(self.atom(ref.ptr)[1], frozen=False)
                view = self.objects.put(ref.ptr, IndexedTreeDict(self, fields["data"], fields["indexes"]))
            return view
        return self.view(ref.ptr, ref.kind)

    def _ref(self, ptr: int, kind: int) -> Any:
        """The codec's `ref` hook: a Ref met while decoding a frozen value, resolved."""
        return self.value(Ref(ptr, kind))

    def resolve(self, slot: Any) -> Any:
        """A leaf value as users see it: Refs resolved, scalars as they are."""
        return self.value(slot) if type(slot) is Ref else slot

    def view(self, ptr: int, kind: int) -> Any:
        """The read-only view of the tree rooted at `ptr` (0: an empty tree of that kind)."""
        view = self.objects.get(-ptr) if ptr else None
        if view is None:
            view = VIEW_OF_LEAF_KIND[LEAF_OF[kind]](self, ptr)
            if ptr:
                self.objects.put(-ptr, view)
        return view

    def root(self, ptr: int) -> Any:
        """The database root (always a dict tree) at `ptr`."""
        return self.view(ptr, DICT_LEAF)

    def write_through(self, ptr: int, value: Any) -> None:
        """Cache what this process just wrote at `ptr`, so its next read is a hit."""
        self.objects.put(ptr, value)

    def clear(self) -> None:
        """Empty both caches: a compaction unlinked the atoms their entries came from."""
        self.objects.clear()
        self.bytes.clear()
