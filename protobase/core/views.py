"""Read-only views of persistent trees: TreeDict, TreeSet, TreeList.

A large dict, set or list in a snapshot is a view over its tree of atoms: it
loads nodes on demand through the process's Store and never copies the
collection. Views are immutable and cached per root pointer, so one view
serves every snapshot of the process; every write raises ReadOnlyError.

Views are not subclasses of dict, list or set: their contents live in the
tree, not in a builtin's storage, and C code reading that storage directly
(json, `PyDict_Next` fast paths) would see nothing. They are `Mapping`,
`Sequence` and `Set` types; `protobase.thaw` and `protobase.json_default` turn
them into plain data. A `TreeDict` memoises key -> value per view (so per tree
version): a warm point read is one Python call doing one C-level dict lookup.

`TreeDict` and `IndexedTreeDict` are `protobase.query.QuerySource`s: `where()`
plans over the index readers of `query_indexes()`, which memoise equality
searches in the view, for as long as the view (one tree version) lives.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, Mapping, Sequence, Set, ValuesView
from types import MappingProxyType
from typing import Any, Protocol

from protobase.core.arena import DICT_LEAF, LIST_LEAF, SET_LEAF
from protobase.core.btree import TreeAccess
from protobase.core.cache import AtomObjectCache
from protobase.core.frozen import refuse_write, thaw
from protobase.core.index import IndexTreeReader, Postings
from protobase.query.results import Queryable
from protobase.query.source import IndexName, IndexReader

__all__ = ["TreeDict", "IndexedTreeDict", "TreeSet", "TreeList", "VIEW_OF_LEAF_KIND", "TreeSource"]


class TreeSource(Protocol):
    """What a view reads its tree through: the process's Store (store.py).

    A protocol, so that this module needs nothing of store.py, which imports
    it to build the views.
    """

    @property
    def access(self) -> TreeAccess: ...  # the tree algorithms over the process's node cache

    @property
    def objects(self) -> AtomObjectCache: ...  # its capacity bounds a TreeDict's memo

    def resolve(self, slot: Any) -> Any:
        """A leaf value as users see it: Refs resolved, scalars as they are."""
        ...

    def get(self, root: int, key: Any) -> Any:
        """The value under `key` in the dict tree at `root`, resolved; KeyError if absent (a point read)."""
        ...

    def lookup(self, root: int, key: Any, leaf_kind: int) -> Any:
        """The slot under `key` in the dict or set tree at `root`; KeyError if absent."""
        ...


class _TreeView:
    __slots__ = ("_store", "_ptr")
    _leaf_kind = DICT_LEAF

    def __init__(self, store: TreeSource, ptr: int) -> None:
        self._store = store  # the process's Store that loads our nodes
        self._ptr = ptr  # AtomPointer of the root node; 0 for an empty tree

    @property
    def ptr(self) -> int:
        """The AtomPointer of this tree's root (0 when empty)."""
        return self._ptr

    def __len__(self) -> int:
        return self._store.access.count(self._ptr, self._leaf_kind) if self._ptr else 0

    def __reduce__(self) -> tuple[Any, ...]:
        # pickle and copy make the plain value: a view is bound to this process's Store
        return (_TreeView._from_plain, (self.thaw(),))

    @staticmethod
    def _from_plain(value: Any) -> Any:
        return value

    def thaw(self) -> Any:
        """A plain, mutable, deep copy (see protobase.thaw)."""
        return thaw(self)


class TreeDict(Queryable, _TreeView, Mapping[Any, Any]):
    """A large dict from a snapshot: a read-only Mapping that loads entries from its tree on demand.

    Not a dict subclass: every read answers from the whole tree, and C code
    that reads a dict's own storage (json, `PyDict_Next` fast paths) would see
    only what was read so far. `json.dumps(value, default=protobase.json_default)`
    and `protobase.thaw(value)` give plain data. A warm `view[key]` is one
    Python call doing a C-level lookup in the view's memo of the entries read
    (bounded by the object cache's capacity, dying with the view); every write
    raises ReadOnlyError.
    """

    __slots__ = ("_memo",)

    def __init__(self, store: TreeSource, ptr: int) -> None:
        super().__init__(store, ptr)
        # {key -> value} of the entries read so far. A plain dict, never handed out
        # (its storage is not the view's contents): the interpreter specialises a
        # subscript of an exact dict, and the try costs nothing until it catches.
        self._memo: dict[Any, Any] = {}

    def __getitem__(self, key: Any) -> Any:
        try:
            return self._memo[key]
        except KeyError:
            return self._load(key)

    def memoised(self) -> list[tuple[Any, Any]]:
        """The (key, value) pairs read so far, a copy (the Store carries them over to a newer root's view)."""
        return list(self._memo.items())

    def memoise(self, key: Any, value: Any) -> None:
        """Take `value` as what `key` holds, as if read (the Store's, for a value it knows this tree holds)."""
        self._memo[key] = value

    def _load(self, key: Any) -> Any:
        """The value at `key`, read from the tree and memoised; KeyError when absent."""
        if not self._ptr:
            raise KeyError(key)
        store = self._store
        try:
            value = store.get(self._ptr, key)
        except TypeError:  # a key that cannot be stored cannot be found
            raise KeyError(key) from None
        if len(self._memo) < store.objects.capacity:
            self._memo[key] = value
        return value

    def __contains__(self, key: object) -> bool:
        try:
            self[key]
        except (KeyError, TypeError):
            return False
        return True

    def __iter__(self) -> Iterator[Any]:
        return self._store.access.keys(self._ptr, DICT_LEAF) if self._ptr else iter(())

    def __reversed__(self) -> Iterator[Any]:
        if not self._ptr:
            return iter(())
        leaves = self._store.access.leaves(self._ptr, DICT_LEAF, reverse=True)
        return (key for leaf in leaves for key in reversed(leaf.keys or ()))

    def get(self, key: Any, default: Any = None) -> Any:
        try:
            return self[key]
        except (KeyError, TypeError):
            return default

    def items(self) -> _TreeItems:
        return _TreeItems(self)

    def values(self) -> _TreeValues:
        return _TreeValues(self)

    def _raw_items(self) -> Iterator[tuple[Any, Any]]:
        return self._store.access.items(self._ptr) if self._ptr else iter(())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        if len(self) != len(other):
            return False
        return all(key in other and other[key] == value for key, value in self.items())

    __hash__ = None  # type: ignore[assignment]

    def copy(self) -> dict[Any, Any]:
        """A shallow plain dict of the whole tree."""
        return dict(self.items())

    def __or__(self, other: Any) -> dict[Any, Any]:
        return {**self.copy(), **other}

    def __ror__(self, other: Any) -> dict[Any, Any]:
        return {**other, **self.copy()}

    def _protobase_plain_(self) -> dict[Any, Any]:
        return self.copy()

    __setitem__ = __delitem__ = __ior__ = refuse_write
    clear = pop = popitem = setdefault = update = refuse_write

    def __repr__(self) -> str:
        return f"TreeDict(<{len(self)} keys at {self._ptr:#x}>)"


class IndexedTreeDict(TreeDict):
    """A TreeDict of records with secondary indexes (see index.py); `where` uses them through query_indexes()."""

    __slots__ = ("_indexes", "_postings", "_readers", "_atom")

    def __init__(self, store: TreeSource, ptr: int, indexes: dict[IndexName, int], atom: int = 0) -> None:
        super().__init__(store, ptr)
        self._atom = atom  # AtomPointer of the collection's own atom (its data and index pointers), 0 if none
        self._indexes = indexes  # {index name -> AtomPointer of its index set tree}
        self._postings: Postings = {}  # {(index name, kind, value) -> keys}: equality searches, memoised
        self._readers: dict[IndexName, IndexReader] | None = None  # query_indexes(), made on first query

    @property
    def atom(self) -> int:
        """The AtomPointer of the collection's own atom (where the object cache keeps this view), 0 if none."""
        return self._atom

    @property
    def indexes(self) -> tuple[IndexName, ...]:
        """The indexed fields (a tuple of fields for a composite index)."""
        return tuple(sorted(self._indexes, key=lambda name: (isinstance(name, tuple), name)))

    @property
    def index_pointers(self) -> Mapping[IndexName, int]:
        """{index name -> AtomPointer of its index set tree (0 when empty)}, read-only (db.check() reads it)."""
        return MappingProxyType(self._indexes)

    def query_indexes(self) -> Mapping[IndexName, IndexReader]:
        """{index name -> reader over its tree}; the readers memoise equality searches in this view."""
        readers = self._readers
        if readers is None:
            access, postings = self._store.access, self._postings
            readers = self._readers = {
                name: IndexTreeReader(access, ptr, name, postings) for name, ptr in self._indexes.items()
            }
        return readers

    def __repr__(self) -> str:
        return f"IndexedTreeDict(<{len(self)} keys at {self._ptr:#x}, indexes {list(self.indexes)}>)"


class _TreeItems(ItemsView[Any, Any]):
    """items() of a TreeDict: iterates the tree in key order."""

    _mapping: TreeDict  # set by ItemsView.__init__

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        resolve = self._mapping._store.resolve
        return ((key, resolve(slot)) for key, slot in self._mapping._raw_items())


class _TreeValues(ValuesView[Any]):
    """values() of a TreeDict: iterates the tree in key order."""

    _mapping: TreeDict  # set by ValuesView.__init__

    def __iter__(self) -> Iterator[Any]:
        resolve = self._mapping._store.resolve
        return (resolve(slot) for _, slot in self._mapping._raw_items())


class TreeSet(_TreeView, Set[Any]):
    """A large set from a snapshot: a Set over a set tree."""

    __slots__ = ()
    _leaf_kind = SET_LEAF
    _index_elements_ = True  # an index holds an entry per element, as for a set

    def __contains__(self, item: object) -> bool:
        if not self._ptr:
            return False
        try:
            self._store.lookup(self._ptr, item, SET_LEAF)
        except (KeyError, TypeError):
            return False
        return True

    def __iter__(self) -> Iterator[Any]:
        return self._store.access.keys(self._ptr, SET_LEAF) if self._ptr else iter(())

    @classmethod
    def _from_iterable(cls, iterable: Any) -> frozenset[Any]:
        return frozenset(iterable)

    def _protobase_plain_(self) -> set[Any]:
        return set(self)

    __hash__ = Set._hash
    add = discard = remove = pop = clear = update = refuse_write
    difference_update = intersection_update = symmetric_difference_update = refuse_write

    def __repr__(self) -> str:
        return f"TreeSet(<{len(self)} elements at {self._ptr:#x}>)"


class TreeList(_TreeView, Sequence[Any]):
    """A large list from a snapshot: a Sequence over a counted list tree."""

    __slots__ = ()
    _leaf_kind = LIST_LEAF
    _index_elements_ = True  # an index holds an entry per element, as for a list

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1 or not self._ptr:
                return [self[i] for i in range(start, stop, step)]
            store = self._store
            return [store.resolve(slot) for slot in store.access.values_at(self._ptr, LIST_LEAF, start, stop)]

        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError("list index out of range")
        store = self._store
        return store.resolve(store.access.at(self._ptr, index))

    def __iter__(self) -> Iterator[Any]:
        resolve = self._store.resolve
        values = self._store.access.values(self._ptr, LIST_LEAF) if self._ptr else iter(())
        return (resolve(slot) for slot in values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, TreeList)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def _protobase_plain_(self) -> list[Any]:
        return list(self)

    __setitem__ = __delitem__ = __iadd__ = __imul__ = refuse_write
    append = extend = insert = pop = remove = clear = sort = reverse = refuse_write

    def __repr__(self) -> str:
        return f"TreeList(<{len(self)} items at {self._ptr:#x}>)"


VIEW_OF_LEAF_KIND = {DICT_LEAF: TreeDict, SET_LEAF: TreeSet, LIST_LEAF: TreeList}
