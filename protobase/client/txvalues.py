"""A transaction's views of stored containers: TxDict, TxList, TxSet, and `adopt` that picks one.

Owns how reading a stored container through a transaction hands out a
wrapper that records every change in the transaction's write set
(writeset.py): dicts at key-addressable paths record key-level writes (so
two transactions writing different keys of one record do not conflict);
large (tree) lists and sets record element operations, so the coordinator
writes O(log n) atoms for them too. Small lists and sets, and registered
dataclasses, are tracked copies written back whole (tracked.py); a dict the
transaction assigned itself reads back as a LocalDict (local.py). Runs in
client processes.

Invariant: the wrappers never change the snapshot's frozen objects, which
are shared with every other reader of this process; a wrapper reads its own
transaction's writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, MutableSequence, MutableSet
from typing import Any

from protobase.client.local import LocalDict
from protobase.client.tracked import Owner, is_mutable_dataclass, track, tracked_whole
from protobase.client.writeset import WriteSet, check_increment, index_name, validate
from protobase.core import codec
from protobase.core.frozen import FrozenDict, FrozenList, FrozenSet, thaw
from protobase.core.views import IndexedTreeDict, TreeDict, TreeList, TreeSet
from protobase.keyorder import check_key
from protobase.query import Expr, IndexReader, Query
from protobase.query.source import IndexName
from protobase.wire.opcodes import (
    LIST_APPEND,
    LIST_DELETE,
    LIST_INSERT,
    LIST_SET,
    OP_CREATE_INDEX,
    OP_DELETE,
    OP_DROP_INDEX,
    OP_INCR,
    OP_LIST,
    OP_SET,
    OP_SET_ADD,
    OP_SET_DISCARD,
)

__all__ = ["TxDict", "TxList", "TxSet", "adopt"]

_DELETED = object()  # marks a key deleted in this transaction


class _Increment:
    """What a TxDict holds for a key this transaction only incremented: the amount, added at commit."""

    __slots__ = ("n",)

    def __init__(self, n: int | float) -> None:
        self.n = n  # the sum of this transaction's increments of the key


def _number(value: object, path: tuple[Any, ...]) -> int | float:
    if type(value) is int or type(value) is float:
        return value
    raise TypeError(f"incr() adds to a number, but {path!r} holds a {type(value).__name__}")


def adopt(writes: WriteSet, path: tuple[Any, ...], value: Any) -> Any:
    """The transaction's mutable stand-in for a snapshot value read at `path`."""
    kind = type(value)
    if kind is FrozenDict or kind is TreeDict or kind is IndexedTreeDict:
        return TxDict(writes, path, value)
    if kind is FrozenList or kind is FrozenSet or is_mutable_dataclass(value):
        owner = Owner(writes, path)
        owner.container = track(value, owner, path)
        writes.own(owner)
        return owner.container
    if kind is TreeList:
        return TxList(writes, path, value)
    if kind is TreeSet:
        return TxSet(writes, path, value)
    if kind is tuple:
        return thaw(value)
    return value


class TxDict(MutableMapping[Any, Any]):
    """A dict inside a transaction: reads its snapshot value, records key-level writes."""

    __slots__ = ("_writes", "_path", "_base", "_local", "_children")

    def __init__(self, writes: WriteSet, path: tuple[Any, ...], base: Any) -> None:
        self._writes = writes  # of the transaction it belongs to
        self._path = path  # key path from the root
        self._base = base  # FrozenDict or TreeDict of the snapshot
        self._local: dict[Any, Any] = {}  # {key -> value or _DELETED} written in this transaction
        self._children: dict[Any, Any] = {}  # {key -> wrapper handed out for a snapshot value}

    @property
    def _protobase_path_(self) -> tuple[Any, ...]:
        """The key path of the dict this wraps.

        codec.validate refuses a wrapper stored below its own path (it would
        contain itself): wrappers build their contents on demand, so only
        their path can tell.
        """
        return self._path

    def __getitem__(self, key: Any) -> Any:
        writes = self._writes
        writes.check_active()
        if writes.serializable:
            writes.reads.add(self._path + (key,))
        local = self._local
        if key in local:
            value = local[key]
            if value is _DELETED:
                raise KeyError(key)
            if type(value) is _Increment:  # what this snapshot shows plus this transaction's increments
                return self._base.get(key, 0) + value.n
            return LocalDict(writes, self._path + (key,), value) if type(value) is dict else value
        child = self._children.get(key)
        if child is not None:
            return child
        value = self._base[key]
        adopted = adopt(writes, self._path + (key,), value)
        if adopted is not value:
            self._children[key] = adopted
        return adopted

    def __setitem__(self, key: Any, value: Any) -> None:
        self._writes.check_active()
        path = self._path + (key,)
        check_key(key, path)
        validate(value, path)
        self._local[key] = value
        self._children.pop(key, None)
        self._writes.record(path, OP_SET, value)

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """Set each key of `other` (a mapping, or (key, value) pairs) and of `kwargs`, as `dict.update` does.

        The way to write many records at once (`users.update(records)`): the
        values are checked in one walk of the compiled core and recorded as
        one entry (`WriteSet.record_sets`), whose SETs are listed at commit;
        the coordinator merges such a run of SETs into the collection in one
        pass. Changing `other` afterwards changes nothing of what commits.
        A value that cannot be stored raises EncodingError naming its key, and
        then nothing of this update is recorded.
        """
        writes = self._writes
        writes.check_active()
        items = other.copy() if type(other) is dict and not kwargs else dict(other, **kwargs)  # ours from here
        if not codec.storable(items, len(self._path)):
            for key, value in items.items():  # the per-key checks name what cannot be stored
                check_key(key, self._path + (key,))
                validate(value, self._path + (key,))
            # Everything passed them: storable() only has no fast path here (pure Python).
        self._local.update(items)
        if self._children:
            for key in items:
                self._children.pop(key, None)
        writes.record_sets(self._path, items)

    def incr(self, key: Any, n: int | float = 1) -> None:
        """Add `n` to the number at `key` when the transaction commits; a missing key counts as 0.

        Conflict-free: the coordinator adds `n` to the latest value at commit,
        whatever other transactions committed meanwhile, so concurrent `incr`s
        of one key never conflict (as Redis INCR). Returns nothing: the value
        is only known once committed. Reading the key in this transaction
        gives its snapshot value plus this transaction's increments, which
        the committed value may exceed; a transaction that needs the exact
        committed value reads it afterwards, or reads and assigns
        (`d[key] = d[key] + 1`, which conflicts with a concurrent write).

        What stays serializable: increments commute, so a transaction whose
        only access to `key` is `incr` is serializable at its commit. One that
        also reads `key` sees its snapshot's value (snapshot isolation); with
        `isolation="serializable"` that read is validated, and a concurrent
        change to `key` makes it conflict. (Serializable transactions also
        validate the dicts they reached: `tx.root["stats"].incr("adds")` reads
        `root["stats"]`, so a concurrent write inside it conflicts; only
        snapshot isolation, the default, makes that increment conflict-free.)
        A transaction that assigned or deleted `key` before incrementing it
        adds `n` to its own value (an ordinary write, validated as one).

        Raises TypeError for an `n` that is not an int of 64 bits or a finite
        float (this transaction's increments of one key summed, too), or when
        this transaction already knows `key` holds something else than a
        number; the commit is refused (PathError) if the latest value is not a
        number.
        """
        self._writes.check_active()
        path = self._path + (key,)
        check_key(key, path)
        check_increment(n)
        local = self._local.get(key)
        if type(local) is _Increment:
            check_increment(local.n + n)  # one op carries the sum
            local.n += n
            self._writes.record(path, OP_INCR, local.n)
        elif local is _DELETED:
            self[key] = n
        elif key in self._local:
            self[key] = _number(local, path) + n
        else:
            if key in self._base:
                _number(self._base[key], path)  # fail here, not at commit, for what the snapshot shows
            self._local[key] = _Increment(n)
            self._children.pop(key, None)
            self._writes.record(path, OP_INCR, n)

    def __delitem__(self, key: Any) -> None:
        if key not in self:
            raise KeyError(key)
        self._local[key] = _DELETED
        self._children.pop(key, None)
        self._writes.record(self._path + (key,), OP_DELETE, None)

    def __contains__(self, key: object) -> bool:
        self._writes.check_active()
        self._writes.read(self._path + (key,))
        if key in self._local:
            return self._local[key] is not _DELETED
        return key in self._base

    def __iter__(self) -> Iterator[Any]:
        self._writes.check_active()
        self._writes.read(self._path)
        local = self._local
        for key in self._base:
            if local.get(key, None) is not _DELETED:
                yield key
        for key, value in list(local.items()):
            if value is not _DELETED and key not in self._base:
                yield key

    def __len__(self) -> int:
        self._writes.check_active()
        self._writes.read(self._path)
        count = len(self._base)
        for key, value in self._local.items():
            in_base = key in self._base
            count += (value is not _DELETED and not in_base) - (value is _DELETED and in_base)
        return count

    def _protobase_plain_(self) -> dict[Any, Any]:
        return {key: self[key] for key in self}

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (dict, MutableMapping, TreeDict)):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TxDict({self._protobase_plain_()!r})" if len(self) <= 20 else f"TxDict(<{len(self)} keys>)"

    # -- queries and indexes -----------------------------------------------------

    def where(self, expr: Expr | None = None) -> Query:
        """Records matching `expr` (see protobase.query), seeing this transaction's own writes."""
        self._writes.check_active()
        return Query(self, expr)

    def create_index(self, *fields: str) -> None:
        """Index the records' `field` (dotted for nested: "address.city"); built at commit.

        Several fields make one composite index, ordered by the first field, then
        the next: `create_index("city", "score")` answers `(F.city == X) & (F.score > Y)`
        by reading exactly the matching entries.
        """
        self._writes.record_index_op(self._path, OP_CREATE_INDEX, index_name(fields))

    def drop_index(self, *fields: str) -> None:
        """Remove the index on `fields` (as given to create_index) at commit."""
        self._writes.record_index_op(self._path, OP_DROP_INDEX, index_name(fields))

    @property
    def indexes(self) -> tuple[str, ...]:
        """The fields indexed in the snapshot this transaction reads."""
        indexes: tuple[str, ...] = getattr(self._base, "indexes", ())
        return indexes

    def query_indexes(self) -> Mapping[IndexName, IndexReader]:
        """The snapshot's indexes (protobase.query.QuerySource); query_changed_keys() says where they are stale."""
        indexes: Mapping[IndexName, IndexReader] = self._base.query_indexes()
        return indexes

    def query_changed_keys(self) -> frozenset[Any]:
        """Keys of this mapping that this transaction wrote, or wrote inside (protobase.query.QuerySource)."""
        changed = set(self._local)
        changed.update(self._writes.keys_written_below(self._path))
        return frozenset(changed)


# -- large containers: element operations --------------------------------------------------


class TxList(MutableSequence[Any]):
    """A large (tree) list in a transaction: records element operations for the coordinator.

    Appends stay lazy; the first other change copies the list locally so this
    transaction reads its own writes.
    """

    _index_elements_ = True  # queries and indexes see its elements, as for a list

    def __init__(self, writes: WriteSet, path: tuple[Any, ...], base: TreeList) -> None:
        self._writes = writes
        self._path = path
        self._base = base  # the snapshot's TreeList
        self._items: list[Any] | None = None  # local copy once a non-append change happened
        self._tail: list[Any] = []  # appended values while there is no local copy
        self._ops: list[list[Any]] = []  # [[LIST_*, index, value]] in order
        self._whole = False  # True once reordered: the list is written whole at commit
        self._changed: dict[int, Any] = {}  # {id(element) -> element} of changed container elements

    @property
    def _protobase_path_(self) -> tuple[Any, ...]:
        """The key path of the list this wraps."""
        return self._path

    def _op(self, code: int, index: Any, value: Any) -> None:
        self._writes.check_active()
        if not self._whole:
            self._ops.append([code, index, value])
        self._writes.record_deferred(self._path, self._wire_ops)

    def _wire_ops(self) -> list[Any]:
        if self._whole:
            return [[OP_SET, list(self._path), list(self._local())]]
        ops = list(self._ops)
        # A changed element is written where it stands after every insert and delete.
        for element in self._changed.values():
            index = next((i for i, item in enumerate(self._local()) if item is element), None)
            if index is not None:
                ops.append([LIST_SET, index, element])
        return [[OP_LIST, list(self._path), ops]] if ops else []

    def _element_changed(self, element: Any) -> None:
        self._writes.check_active()
        self._changed[id(element)] = element
        self._writes.record_deferred(self._path, self._wire_ops)

    def sort(self, *, key: Callable[[Any], Any] | None = None, reverse: bool = False) -> None:
        """Sort in place; every position may move, so the list is written whole at commit."""
        self._local().sort(key=key, reverse=reverse)
        self._reordered()

    def reverse(self) -> None:
        """Reverse in place; the list is written whole at commit."""
        self._local().reverse()
        self._reordered()

    def _reordered(self) -> None:
        self._whole = True
        self._ops = []
        self._op(LIST_SET, None, None)

    def _local(self) -> list[Any]:
        if self._items is None:
            self._items = [self._adopt_element(i, v) for i, v in enumerate(self._base)] + self._tail
            self._tail = []
        return self._items

    def _adopt_element(self, index: int, value: Any) -> Any:
        # Positions move with inserts and deletes, so an element is not a stable key
        # path: a container element reports its changes to the list instead.
        if tracked_whole(value):
            owner = _ElementOwner(self._writes, self)
            owner.element = track(value, owner, self._path + (index,))
            self._writes.own(owner)
            return owner.element
        return adopt(self._writes, self._path + (index,), value)

    def __len__(self) -> int:
        self._writes.read(self._path)
        return len(self._items) if self._items is not None else len(self._base) + len(self._tail)

    def __getitem__(self, index: Any) -> Any:
        self._writes.read(self._path)
        if isinstance(index, slice) or self._items is not None:
            return self._local()[index]
        length = len(self)
        if index < 0:
            index += length
        if not 0 <= index < length:
            raise IndexError("list index out of range")
        if index >= len(self._base):
            return self._tail[index - len(self._base)]
        return self._local()[index] if tracked_whole(self._base[index]) else self._base[index]

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, slice):
            raise TypeError("slice assignment is not supported on large stored lists; assign a new list")
        validate(value, self._path + (index,))
        items = self._local()
        items[index] = value
        self._op(LIST_SET, index % len(items), value)

    def __delitem__(self, index: Any) -> None:
        if isinstance(index, slice):
            raise TypeError("slice deletion is not supported on large stored lists; assign a new list")
        items = self._local()
        del items[index]
        self._op(LIST_DELETE, index % (len(items) + 1), None)

    def insert(self, index: int, value: Any) -> None:
        validate(value, self._path + (index,))
        items = self._local()
        length = len(items)
        position = max(0, min(length, index if index >= 0 else length + index))
        items.insert(position, value)
        self._op(LIST_INSERT, position, value)

    def append(self, value: Any) -> None:
        validate(value, self._path + (len(self),))
        (self._items if self._items is not None else self._tail).append(value)
        self._op(LIST_APPEND, None, value)

    def extend(self, values: Iterable[Any]) -> None:
        for value in values:
            self.append(value)

    def _protobase_plain_(self) -> list[Any]:
        return list(self)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, MutableSequence, TreeList)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TxList(<{len(self)} items>)"


class _ElementOwner:
    """Tells a TxList that one of its container elements changed."""

    __slots__ = ("writes", "txlist", "element")

    def __init__(self, writes: WriteSet, txlist: TxList) -> None:
        self.writes = writes  # the list's
        self.txlist: TxList | None = txlist  # None once released
        self.element: Any = None  # the tracked element, set once built

    def __call__(self) -> None:
        self.writes.check_active()  # once the transaction ended: DatabaseClosedError
        assert self.txlist is not None, "an element owner is released only once its transaction ended"
        self.txlist._element_changed(self.element)

    def release(self) -> None:
        """Let go of the list, which holds the element, which holds this owner: the transaction ended."""
        self.txlist = None
        self.element = None


class TxSet(MutableSet[Any]):
    """A large (tree) set in a transaction: records additions and removals."""

    _index_elements_ = True  # queries and indexes see its elements, as for a set

    def __init__(self, writes: WriteSet, path: tuple[Any, ...], base: TreeSet) -> None:
        self._writes = writes
        self._path = path
        self._base = base  # the snapshot's TreeSet
        self._added: set[Any] = set()  # elements added here, not in base
        self._removed: set[Any] = set()  # base elements removed here

    @property
    def _protobase_path_(self) -> tuple[Any, ...]:
        """The key path of the set this wraps."""
        return self._path

    def __contains__(self, item: object) -> bool:
        self._writes.read(self._path)
        return item in self._added or (item not in self._removed and item in self._base)

    def __iter__(self) -> Iterator[Any]:
        self._writes.read(self._path)
        for item in self._base:
            if item not in self._removed:
                yield item
        yield from list(self._added)

    def __len__(self) -> int:
        self._writes.read(self._path)
        return len(self._base) - len(self._removed) + len(self._added)

    def add(self, item: Any) -> None:
        self._writes.check_active()
        check_key(item, self._path)
        if item in self._removed:
            self._removed.discard(item)
        elif item not in self._base:
            self._added.add(item)
        self._writes.record_deferred(self._path, self._wire_ops)

    def discard(self, item: Any) -> None:
        self._writes.check_active()
        if item in self._added:
            self._added.discard(item)
        elif item in self._base:
            self._removed.add(item)
        self._writes.record_deferred(self._path, self._wire_ops)

    def _wire_ops(self) -> list[Any]:
        ops: list[Any] = []
        if self._removed:
            ops.append([OP_SET_DISCARD, list(self._path), list(self._removed)])
        if self._added:
            ops.append([OP_SET_ADD, list(self._path), list(self._added)])
        return ops

    @classmethod
    def _from_iterable(cls, iterable: Iterable[Any]) -> set[Any]:
        return set(iterable)

    def _protobase_plain_(self) -> set[Any]:
        return set(self)

    def __repr__(self) -> str:
        return f"TxSet(<{len(self)} elements>)"
