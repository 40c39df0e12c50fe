"""What a query runs over: the `QuerySource` and `IndexReader` protocols.

Owns the interface between the planner and the collections. The planner reads
a collection only through `QuerySource`: its records as a read-only mapping,
its indexes as `IndexReader`s, and the keys a transaction changed. Collections
(core's FrozenDict, TreeDict and IndexedTreeDict; client's TxDict and
LocalDict) implement it; the query layer imports none of them, so the
dependency points from the collections down to the planner.

An `IndexReader` answers the three searches an index supports, each as an
exact count (an O(log n) estimate for the planner) and as the record keys:

* equality: records whose field equals `value` (`element=True`: whose list,
  tuple or set value holds it, what `F.tags.contains(x)` asks);
* range: records whose field lies in an `Interval`, only values of the
  bounds' type family comparing with them (a str never lies in a numeric range);
* prefix, for a composite index (several fields): equalities on its first
  fields, then maybe an `Interval` on the next.

How entries are laid out and searched is the index's business (core/index.py).

Invariant a collection keeps: `query_indexes()` describes the same records as
its mapping, except the keys `query_changed_keys()` names, which the query
rechecks against their current values.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from types import MappingProxyType
from typing import Any, Final, NamedTuple, Protocol, runtime_checkable

__all__ = ["QuerySource", "IndexReader", "IndexName", "Interval", "NO_INDEXES"]

IndexName = str | tuple[str, ...]
"""An index's name: its field ("address.city"), or the tuple of fields of a composite index."""


class Interval(NamedTuple):
    """low <(=) value <(=) high; a None side is open (both None never reaches an index)."""

    low: Any
    high: Any
    include_low: bool
    include_high: bool


@runtime_checkable
class IndexReader(Protocol):
    """One index of a collection, as the planner reads it (see the module docstring)."""

    def count_equal(self, value: Any, *, element: bool = False) -> int:
        """How many entries equal `value` (element: how many records' collections hold it)."""
        ...

    def keys_equal(self, value: Any, *, element: bool = False) -> Set[Any]:
        """Keys of the records that `count_equal` counts (possibly memoised: never change the set)."""
        ...

    def count_range(self, interval: Interval) -> int:
        """How many entries lie in `interval` (of values of its bounds' type family)."""
        ...

    def keys_range(self, interval: Interval) -> Iterable[Any]:
        """Keys of the records whose value lies in `interval`."""
        ...

    def count_prefix(self, prefix: tuple[Any, ...], ranged: Interval | None = None) -> int:
        """How many entries of a composite index start with `prefix`, then (when given) lie in `ranged`."""
        ...

    def keys_prefix(self, prefix: tuple[Any, ...], ranged: Interval | None = None) -> Iterable[Any]:
        """Keys of the records that `count_prefix` counts."""
        ...


@runtime_checkable
class QuerySource(Protocol):
    """A collection a query runs over: a read-only mapping of key -> record, its indexes and changed keys."""

    def __len__(self) -> int: ...

    def __getitem__(self, key: Any, /) -> Any: ...

    def __contains__(self, key: object, /) -> bool: ...

    def keys(self) -> Iterable[Any]: ...

    def items(self) -> Iterable[tuple[Any, Any]]: ...

    def query_indexes(self) -> Mapping[IndexName, IndexReader]:
        """{index name -> reader} of the indexes that answer for this collection's records."""
        ...

    def query_changed_keys(self) -> frozenset[Any]:
        """Keys whose records may differ from what the indexes say (written in a transaction); else empty."""
        ...


NO_INDEXES: Final[Mapping[IndexName, IndexReader]] = MappingProxyType({})
"""What `query_indexes()` returns for a collection without indexes (shared, read-only)."""
