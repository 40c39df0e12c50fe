"""Read-only views of persistent trees: TreeDict, TreeSet, TreeList.

A large dict, set or list in a snapshot is a view over its tree of atoms: it
loads nodes on demand through the process's Store and never copies the
collection. Views are immutable and cached per root pointer, so one view
serves every snapshot of the process; every write raises ReadOnlyError.

`TreeDict` memoises key -> value per view (so per tree version): a warm
point read is one dict lookup. The memo is bounded by the object cache's
capacity and dies with the view.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence, Set
from typing import TYPE_CHECKING, Any

from .arena import DICT_LEAF, LIST_LEAF, SET_LEAF
from .frozen import _read_only, thaw

if TYPE_CHECKING:
    from .store import Store

__all__ = ["TreeDict", "TreeSet", "TreeList", "VIEW_OF_LEAF_KIND"]


class _TreeView:
    __slots__ = ("_store", "_ptr")
    _leaf_kind = DICT_LEAF

    def __init__(self, store: Store, ptr: int) -> None:
        self._store = store  # the process's Store that loads our nodes
        self._ptr = ptr  # AtomPointer of the root node; 0 for an empty tree

    @property
    def ptr(self) -> int:
        """The AtomPointer of this tree's root (0 when empty)."""
        return self._ptr

    def __len__(self) -> int:
        return self._store.access.count(self._ptr, self._leaf_kind) if self._ptr else 0

    def __reduce__(self) -> tuple:
        return (type(self)._from_plain, (self.thaw(),))

    def _protobase_plain_(self) -> Any:
        return self.thaw()


class TreeDict(_TreeView, Mapping):
    """A large dict from a snapshot: a Mapping over a dict tree."""

    __slots__ = ("_memo",)

    def __init__(self, store: Store, ptr: int) -> None:
        super().__init__(store, ptr)
        self._memo: dict = {}  # {key -> resolved value}, filled by reads

    def __getitem__(self, key: Any) -> Any:
        try:
            return self._memo[key]
        except KeyError:
            pass
        if not self._ptr:
            raise KeyError(key)
        store = self._store
        value = store.resolve(store.access.lookup(self._ptr, key))
        if len(self._memo) < store.objects.capacity:
            self._memo[key] = value
        return value

    def __contains__(self, key: object) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        except TypeError:  # unhashable or unorderable: cannot be a stored key
            return False
        return True

    def __iter__(self) -> Iterator[Any]:
        return self._store.access.keys(self._ptr, DICT_LEAF) if self._ptr else iter(())

    def items(self) -> Iterator[tuple[Any, Any]]:  # type: ignore[override]
        resolve = self._store.resolve
        return ((key, resolve(slot)) for key, slot in self._raw_items())

    def values(self) -> Iterator[Any]:  # type: ignore[override]
        resolve = self._store.resolve
        return (resolve(slot) for _, slot in self._raw_items())

    def _raw_items(self) -> Iterator[tuple[Any, Any]]:
        return self._store.access.items(self._ptr) if self._ptr else iter(())

    def thaw(self) -> dict:
        """A plain, mutable, deep copy."""
        return {key: thaw(value) for key, value in self.items()}

    @staticmethod
    def _from_plain(value: dict) -> dict:
        return value

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __repr__(self) -> str:
        return f"TreeDict(<{len(self)} keys at {self._ptr:#x}>)"


class TreeSet(_TreeView, Set):
    """A large set from a snapshot: a Set over a set tree."""

    __slots__ = ()
    _leaf_kind = SET_LEAF

    def __contains__(self, item: object) -> bool:
        if not self._ptr:
            return False
        try:
            self._store.access.lookup(self._ptr, item, SET_LEAF)
        except (KeyError, TypeError):
            return False
        return True

    def __iter__(self) -> Iterator[Any]:
        return self._store.access.keys(self._ptr, SET_LEAF) if self._ptr else iter(())

    @classmethod
    def _from_iterable(cls, iterable: Any) -> frozenset:
        return frozenset(iterable)

    def thaw(self) -> set:
        return set(self)

    @staticmethod
    def _from_plain(value: set) -> set:
        return value

    __hash__ = Set._hash
    add = discard = remove = pop = clear = update = _read_only
    difference_update = intersection_update = symmetric_difference_update = _read_only

    def __repr__(self) -> str:
        return f"TreeSet(<{len(self)} elements at {self._ptr:#x}>)"


class TreeList(_TreeView, Sequence):
    """A large list from a snapshot: a Sequence over a counted list tree."""

    __slots__ = ()
    _leaf_kind = LIST_LEAF

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
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

    def thaw(self) -> list:
        return [thaw(value) for value in self]

    @staticmethod
    def _from_plain(value: list) -> list:
        return value

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only
    append = extend = insert = pop = remove = clear = sort = reverse = _read_only

    def __repr__(self) -> str:
        return f"TreeList(<{len(self)} items at {self._ptr:#x}>)"


VIEW_OF_LEAF_KIND = {DICT_LEAF: TreeDict, SET_LEAF: TreeSet, LIST_LEAF: TreeList}
