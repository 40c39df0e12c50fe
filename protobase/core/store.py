"""Reading atoms as Python objects, through the per-process caches.

A `Store` belongs to one process and one coordinator instance. It turns a
pointer into a node, a frozen value or a read-only tree view, decoding each
atom at most once while it stays cached. Used by workers for snapshots and
transactions, and by the coordinator (with its own writable mappings).

A point read (`lookup`) walks the tree's atoms in place with the compiled
searcher (btree/search.py, cnode.c) and decodes only the entry it returns:
no node is decoded, none is cached, so a reader's heap grows by the records
it reads (cached, bounded by bytes), not by the 64-entry leaves around them
(9 KB each decoded). Iteration, ranges and index queries still decode whole
nodes (`node`), cached and charged by their size. Without the compiled core,
lookups walk decoded, cached nodes as before (decoding a node in Python each
time would cost more than caching it).

Memory: the object cache of a client is bounded by bytes as well as entries
(`DEFAULT_OBJECT_BYTES`); each entry is charged an estimate of the heap it
holds. The coordinator's Store (its reader has a writer) keeps the byte bound
off by default: its cached nodes are the working set of path copying.

Invariant: everything a Store hands out is immutable (frozen values, clean
nodes, read-only views), so one cached object serves every snapshot of the
process safely.
"""

from __future__ import annotations

from typing import Any, Literal

from protobase.core import codec
from protobase.core.arena import DICT_LEAF, INDEXED, VALUE, AtomReader
from protobase.core.btree import LEAF_OF, Node, TreeAccess, decode_node, search
from protobase.core.cache import AtomBytesCache, AtomObjectCache
from protobase.core.codec import Ref
from protobase.core.views import VIEW_OF_LEAF_KIND, IndexedTreeDict, TreeDict
from protobase.settings import DEFAULTS

__all__ = ["Store"]

# Entries (protobase/settings.py): ~150 MB of small decoded records at most; raise with cache_size=.
DEFAULT_OBJECT_CACHE = DEFAULTS.object_cache
DEFAULT_BYTES_CACHE = DEFAULTS.bytes_cache
#: Bytes of decoded objects a client's object cache holds at most (estimated: see `charge_of`).
DEFAULT_OBJECT_BYTES = 64 << 20

# What a cached object is charged (measured with tracemalloc, Python 3.11, on decoded records of 40-240
# payload bytes: 420-575 bytes each; on dict leaves of 64 Refs: 8.8 KB for 1.28 KB of payload).
RECORD_OVERHEAD = 384  # the container, its header and the cache's own entry
NODE_OVERHEAD = 256
NODE_ENTRY = 120  # a decoded key and slot of a node, beyond their bytes
VIEW_CHARGE = 256  # a tree view without its memo
TREE_VIEWS = tuple(VIEW_OF_LEAF_KIND.values())
ROOT_MEMO_CARRIED = 64  # entries of a superseded root's memo looked at (`Store.root`): bounded work per commit


def charge_of(value: Any) -> int:
    """The charge of a cached object whose payload is unknown (a write-through value, a view, a node)."""
    if type(value) is Node:
        return NODE_OVERHEAD + 2 * NODE_ENTRY * value.width()
    return VIEW_CHARGE if isinstance(value, TreeDict) else RECORD_OVERHEAD * 2


def _cache_key(ref: Ref) -> int:
    """The object cache's key for what `ref` stands for: a value or collection's pointer, a tree view's -pointer."""
    return ref.ptr if ref.kind in (VALUE, INDEXED) else -ref.ptr


class Store:
    """Pointer -> object for one process, with write-through caches."""

    def __init__(
        self,
        reader: AtomReader,
        *,
        object_cache: int = DEFAULT_OBJECT_CACHE,
        bytes_cache: int = DEFAULT_BYTES_CACHE,
        object_bytes: int | None | Literal["default"] = "default",
    ) -> None:
        """`object_bytes` bounds the object cache in bytes: None for no byte bound; by default
        DEFAULT_OBJECT_BYTES in a client, none in the coordinator (whose reader has a writer)."""
        self.reader = reader
        if object_bytes == "default":
            object_bytes = None if reader.writer is not None else DEFAULT_OBJECT_BYTES
        self.objects = AtomObjectCache(object_cache, object_bytes, charge_of)
        self.bytes = AtomBytesCache(bytes_cache)
        self.access = TreeAccess(self.node)
        self._ref_hook = self._ref  # one bound method, so the codec's decoder cache hits
        self.searcher = search.Searcher(reader.buffers, reader.atom, self.access.lookup)
        # lookup(root, key, leaf_kind) -> slot: the compiled walk over the atoms' bytes, or the walk over
        # decoded, cached nodes without the compiled core (see the module docstring).
        self.lookup: Any = self.searcher.lookup if search.COMPILED else self.access.lookup
        self.latest_root: TreeDict | None = None  # the view `root` made last

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
            node = decode_node(kind, payload, ptr)
            self.objects.put(ptr, node, NODE_OVERHEAD + 2 * len(payload) + NODE_ENTRY * node.width())
        return node

    def get(self, root: int, key: Any) -> Any:
        """The value under `key` in the dict tree at `root` as users see it; KeyError if absent.

        A point read: the walk decodes only the slot it returns (see `lookup`).
        """
        slot = self.lookup(root, key, DICT_LEAF)
        if type(slot) is not Ref:
            return slot
        if slot.kind != VALUE:
            return self.value(slot)
        # self.record(slot.ptr), inlined: this is every cold point read's path
        ptr, objects = slot.ptr, self.objects
        value = objects.data.get(ptr)
        if value is not None:
            objects.hits += 1
            return value
        objects.misses += 1
        value, length = self.searcher.value(ptr, self._ref_hook)
        return objects.put(ptr, value, RECORD_OVERHEAD + length)

    def record(self, ptr: int) -> Any:
        """The frozen value of the VALUE atom at `ptr`, cached (charged its payload and an overhead)."""
        value = self.objects.get(ptr)
        if value is None:
            value, length = self.searcher.value(ptr, self._ref_hook)
            self.objects.put(ptr, value, RECORD_OVERHEAD + length)
        return value

    def value(self, ref: Ref) -> Any:
        """The read-only object a Ref stands for: a frozen value or a tree view."""
        if ref.kind == VALUE:
            return self.record(ref.ptr)
        if ref.kind == INDEXED:
            view = self.objects.get(ref.ptr)
            if view is None:
                fields = codec.decode(self.atom(ref.ptr)[1], frozen=False)
                view = self.objects.put(ref.ptr, IndexedTreeDict(self, fields["data"], fields["indexes"], ref.ptr))
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

    def root(self, ptr: int) -> TreeDict:
        """The view of the database root (always a dict tree) at `ptr`.

        Kept in a slot of its own, not in the object cache: every commit makes
        a new root, and cached by pointer, the views of superseded roots and of
        the collections they had loaded stayed until evicted, garbage that the
        process's cyclic collector walked in each full collection (a client
        committing in a loop: 230k tracked objects, collections of 35 ms). When
        the root changes, `_supersede` carries what the old root's view read
        over to the new one, and drops the views the new root no longer holds.
        """
        latest = self.latest_root
        if latest is not None and latest.ptr == ptr:
            return latest
        view = TreeDict(self, ptr)
        if latest is not None:
            self._supersede(latest, view)
        self.latest_root = view
        return view

    def _supersede(self, old: TreeDict, new: TreeDict) -> None:
        """Carry what `old` read over to `new` where `new` holds the same cached object; uncache the views it does not.

        Only the new root is read: the old one's atoms may be reclaimed once
        nothing pins it. A view not found under its key in the new root can be
        reached only through superseded roots, so it leaves the cache (the
        snapshots that hold it keep it alive); a record not carried over ages
        out as any entry does (its cache key is not known here). A root whose
        memo holds over ROOT_MEMO_CARRIED entries is left alone: its views age
        out of the cache as any entry does.
        """
        read = old.memoised()
        if len(read) > ROOT_MEMO_CARRIED or not new.ptr:
            return
        cached = self.objects.data
        for key, value in read:
            try:
                slot = self.lookup(new.ptr, key, DICT_LEAF)
            except KeyError:
                slot = None
            if type(slot) is Ref and cached.get(_cache_key(slot)) is value:
                new.memoise(key, value)
            elif isinstance(value, IndexedTreeDict):
                self.objects.discard(value.atom)
            elif isinstance(value, TREE_VIEWS) and value.ptr:
                self.objects.discard(-value.ptr)

    def write_through(self, ptr: int, value: Any) -> None:
        """Cache what this process just wrote at `ptr`, so its next read is a hit."""
        self.objects.put(ptr, value)

    def clear(self) -> None:
        """Empty both caches: their atoms are gone (an abandoned copy), or this store is (a closed session)."""
        self.objects.clear()
        self.bytes.clear()
        self.latest_root = None
