"""Query results: `Query` (what `where()` returns), ordering, limits, aggregates, `Grouped`.

Owns how a plan's key set becomes what the user reads: records are
materialised only at the end, from the final key set; `order_by` and `limit`
make new queries; `sum`, `min`, `max`, `avg` and `group_by` aggregate the
matching records' values of one field (records lacking it are left out).

Inside a transaction a query sees the transaction's own writes: the keys the
source reports changed (`query_changed_keys`) are dropped from what the
indexes found and checked against their current values instead.

Runs in whichever process queries. A Query is planned once, when made, and
reads its collection again on every call (keys, count, iteration); it never
changes the collection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from protobase.keyorder import is_key, order_key
from protobase.query.expressions import Everything, Expr
from protobase.query.fields import MISSING, FieldName, FieldPath, field_name, field_path, field_value
from protobase.query.planner import Planner
from protobase.query.plans import Plan
from protobase.query.source import NO_INDEXES, IndexName, IndexReader, QuerySource

__all__ = ["Query", "Grouped", "Queryable"]


class Queryable:
    """`where()` for a collection, and the QuerySource defaults: no index, no pending changes.

    A mixin for the dicts of records users query: FrozenDict, TreeDict and the
    dicts a transaction assigned (LocalDict) scan their records;
    IndexedTreeDict overrides `indexes` and `query_indexes()` with its index
    readers.
    """

    __slots__ = ()

    def where(self: QuerySource, expr: Expr | None = None) -> Query:
        """The records (values) matching `expr`; see protobase.query."""
        return Query(self, expr)

    @property
    def indexes(self) -> tuple[IndexName, ...]:
        """The indexed fields: none."""
        return ()

    def query_indexes(self) -> Mapping[IndexName, IndexReader]:
        """No indexes (protobase.query.QuerySource)."""
        return NO_INDEXES

    def query_changed_keys(self) -> frozenset[Any]:
        """No keys to recheck: the records are read as they are (protobase.query.QuerySource)."""
        return frozenset()


class Query:
    """The records of a collection matching a condition; lazy until read."""

    def __init__(self, collection: QuerySource, expr: Expr | None = None) -> None:
        if expr is not None and not isinstance(expr, Expr):
            raise TypeError(f"where() takes a condition built from F, e.g. F.city == 'Paris'; got {expr!r}")
        self._source = collection  # where records are read (a transaction's: with its own writes)
        self._changed = collection.query_changed_keys()  # rechecked directly, not taken from an index
        self._expr: Expr = expr if expr is not None else Everything()
        self._plan = Planner(collection).plan(self._expr)
        self._order: tuple[FieldPath, bool] | None = None  # (field path, descending)
        self._limit: int | None = None

    @property
    def plan(self) -> Plan:
        """The plan tree (see explain)."""
        return self._plan

    def explain(self) -> str:
        """The plan as an indented tree of plan nodes with their estimated sizes."""
        lines = self._plan.lines()
        if self._changed:
            lines.append(f"+ {len(self._changed)} keys changed in this transaction, checked directly")
        if self._order is not None:
            lines.append(f"then order by {field_name(self._order[0])}{' descending' if self._order[1] else ''}")
        if self._limit is not None:
            lines.append(f"then limit {self._limit}")
        return "\n".join(lines)

    def _keys(self) -> list[Any]:
        source, changed = self._source, self._changed
        found = self._plan.keys(source)
        if changed and self._plan.uses_index:
            found = {key for key in found if key not in changed}
            found.update(key for key in changed if key in source and self._expr.matches(source[key]))
        keys = list(found)
        if self._order is not None:
            keys = _ordered(keys, source, *self._order)
        if self._limit is not None:
            keys = keys[: self._limit]
        return keys

    def keys(self) -> list[Any]:
        """Keys of the matching records (in no particular order unless order_by was given)."""
        return self._keys()

    def __iter__(self) -> Iterator[Any]:
        value = self._source.__getitem__
        return (value(key) for key in self._keys())

    def items(self) -> list[tuple[Any, Any]]:
        """(key, record) of the matching records."""
        value = self._source.__getitem__
        return [(key, value(key)) for key in self._keys()]

    def count(self) -> int:
        """How many records match; from key sets alone when the plan allows."""
        return len(self._keys())

    def first(self) -> Any:
        """The first matching record (by order_by when given), or None."""
        for record in self.limit(1):
            return record
        return None

    def order_by(self, field: FieldName, descending: bool = False) -> Query:
        """A new query yielding the records sorted by `field` (records lacking it, or unorderable, last)."""
        query = self._copy()
        query._order = (field_path(field), descending)
        return query

    def limit(self, count: int) -> Query:
        """A new query yielding at most `count` records; ValueError if negative."""
        if count < 0:
            raise ValueError(f"limit must be >= 0, got {count}")
        query = self._copy()
        query._limit = count
        return query

    def _copy(self) -> Query:
        query = object.__new__(Query)
        query.__dict__.update(self.__dict__)
        return query

    def _values(self, field: FieldName) -> list[Any]:
        path = field_path(field)
        found = (field_value(record, path) for record in self)
        return [value for value in found if value is not MISSING]

    def sum(self, field: FieldName) -> Any:
        """The sum of `field` over the matches; TypeError when it holds non-numbers."""
        return _sum(self._values(field), field)

    def min(self, field: FieldName) -> Any:
        """The smallest value of `field` (in the canonical key order), or None."""
        return _extreme(self._values(field), min)

    def max(self, field: FieldName) -> Any:
        """The largest value of `field` (in the canonical key order), or None."""
        return _extreme(self._values(field), max)

    def avg(self, field: FieldName) -> Any:
        """The mean of `field`, or None when no match has it."""
        values = self._values(field)
        return _sum(values, field) / len(values) if values else None

    def group_by(self, field: FieldName) -> Grouped:
        """Aggregates per value of `field`: `.count()`, `.sum(f)`, `.min(f)`, `.max(f)`, `.avg(f)`."""
        return Grouped(self, field_path(field))

    def __repr__(self) -> str:
        return f"<Query {self._expr!r}>"


def _ordered(keys: list[Any], source: QuerySource, path: FieldPath, descending: bool) -> list[Any]:
    """`keys` sorted by their records' value at `path`; records lacking it (or unorderable) come last either way."""
    value = source.__getitem__
    ranked = [(_sort_key(field_value(value(key), path)), key) for key in keys]
    present = [pair for pair in ranked if pair[0][0] == 0]
    present.sort(key=lambda pair: pair[0], reverse=descending)
    return [key for _, key in present] + [key for rank, key in ranked if rank[0] != 0]


class Grouped:
    """A query's records grouped by one field (records lacking it are left out)."""

    def __init__(self, query: Query, path: FieldPath) -> None:
        self._query, self._path = query, path

    def _groups(self) -> dict[Any, list[Any]]:
        groups: dict[Any, list[Any]] = {}
        for record in self._query:
            group = field_value(record, self._path)
            if group is not MISSING:
                groups.setdefault(_hashable(group), []).append(record)
        return groups

    def _aggregate(self, field: FieldName, combine: Callable[[list[Any]], Any]) -> dict[Any, Any]:
        path = field_path(field)
        result = {}
        for group, records in self._groups().items():
            values = [value for value in (field_value(r, path) for r in records) if value is not MISSING]
            result[group] = combine(values)
        return result

    def count(self) -> dict[Any, int]:
        """{group value -> number of records}."""
        return {group: len(records) for group, records in self._groups().items()}

    def sum(self, field: FieldName) -> dict[Any, Any]:
        """{group value -> sum of `field`}."""
        return self._aggregate(field, lambda values: _sum(values, field))

    def min(self, field: FieldName) -> dict[Any, Any]:
        """{group value -> smallest value of `field`, or None}."""
        return self._aggregate(field, lambda values: _extreme(values, min))

    def max(self, field: FieldName) -> dict[Any, Any]:
        """{group value -> largest value of `field`, or None}."""
        return self._aggregate(field, lambda values: _extreme(values, max))

    def avg(self, field: FieldName) -> dict[Any, Any]:
        """{group value -> mean of `field`, or None}."""
        return self._aggregate(field, lambda values: _sum(values, field) / len(values) if values else None)


def _sum(values: list[Any], field: Any) -> Any:
    try:
        return sum(values)
    except TypeError:
        kinds = sorted({type(value).__name__ for value in values})
        raise TypeError(
            f"cannot sum field {field!r}: it holds {', '.join(kinds)} values; filter the query to numeric records first"
        ) from None


def _extreme(values: list[Any], pick: Callable[..., Any]) -> Any:
    keys = [value for value in values if is_key(value)]
    return pick(keys, key=order_key) if keys else None


def _sort_key(value: Any) -> tuple[Any, ...]:
    if value is MISSING or not is_key(value):
        return (1,)
    return (0, order_key(value))


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value
