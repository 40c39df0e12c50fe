"""Queries: `F` expressions, the planner, its plans, and query results.

Owns how `collection.where(expr)` finds records. Expressions are built from
`F`: `(F.city == "Paris") & (F.score > 5) | F.tags.contains("vip")`. The
planner turns one into a tree of plans over the collection's indexes:

* `IndexedSearchPlan`: equality, membership (`isin`) or `contains` on an
  indexed field: the keys come straight from the index;
* `IndexedRangeSearchPlan`: `<`, `<=`, `>`, `>=`, `between` on an indexed field;
* `AndMerge`: intersection of key sets, smallest first;
* `OrMerge`: union of key sets (a record key names one AtomPointer in a
  snapshot, so deduplicating keys deduplicates records);
* `FilterPlan`: a predicate checked on the records of a base plan, used for
  terms without an index, and for indexed terms whose key set would be much
  larger than the candidates already found (probing those few records beats
  scanning the big index range);
* `FullScanPlan`: every record, the last resort.

Estimates come from the index trees' subtree sizes (O(log n) per term), so
planning never scans. Records are materialised only at the end, from the
final key set. `explain()` prints the plan tree with its estimates.

Semantics, the same with or without an index: a record lacking the field
matches no comparison but `!=`; values Python cannot compare (5 < "a") do not
match; `contains` is membership in a list, tuple or set value. Inside a
transaction a query sees the transaction's own writes: keys it changed are
checked against their current values instead of the snapshot's index.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from protobase.client.transaction import LocalDict, TxDict
from protobase.core.index import (
    ELEMENT_ENTRY,
    MISSING,
    VALUE_ENTRY,
    composite_bounds,
    count_range,
    equal_bounds,
    field_path,
    field_value,
    range_bounds,
    scan_between,
    scan_equal,
    scan_range,
)
from protobase.core.views import IndexedTreeDict
from protobase.keyorder import is_key, order_key

__all__ = ["F", "Expr", "Query", "Plan", "IndexedSearchPlan", "IndexedRangeSearchPlan", "AndMerge", "OrMerge",
           "FilterPlan", "FullScanPlan", "Grouped"]

PROBE_FACTOR = 8  # probe records instead of scanning an index range this many times larger


# -- expressions ------------------------------------------------------------------------


class Expr:
    """A condition on records; combine with & | ~."""

    def matches(self, record: Any) -> bool:
        raise NotImplementedError

    def __and__(self, other: Expr) -> Expr:
        return And(_parts(self, And) + _parts(other, And))

    def __or__(self, other: Expr) -> Expr:
        return Or(_parts(self, Or) + _parts(other, Or))

    def __invert__(self) -> Expr:
        return Not(self)

    def __bool__(self) -> bool:
        raise TypeError("use & | ~ to combine query conditions, not and / or / not")


def _parts(expr: Expr, kind: type) -> list[Expr]:
    if not isinstance(expr, Expr):
        raise TypeError(f"cannot combine a query condition with {expr!r}")
    return list(expr.parts) if type(expr) is kind else [expr]


_COMPARE = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
            ">": operator.gt, ">=": operator.ge}


class Compare(Expr):
    """field <op> value."""

    def __init__(self, path: tuple, op: str, value: Any) -> None:
        self.path, self.op, self.value = path, op, value

    def matches(self, record: Any) -> bool:
        found = field_value(record, self.path)
        if found is MISSING:
            return self.op == "!="
        try:
            return bool(_COMPARE[self.op](found, self.value))
        except TypeError:
            return self.op == "!="

    def __bool__(self) -> bool:
        if self.op in ("==", "!="):  # what `F.x in [1, 2]` asks of each `element == F.x`
            field = Field(self.path)
            raise TypeError(f"a query condition has no truth value: to test membership use {field!r}.isin(values) "
                            f"(`{field!r} in values` cannot build a condition); to combine conditions use & | ~, "
                            f"not and / or / not")
        return super().__bool__()

    def __repr__(self) -> str:
        return f"{_name(self.path)} {self.op} {self.value!r}"


class _Open:
    """An open side of a range (None is a value: `F.x > None` matches nothing, as in Python)."""

    def __repr__(self) -> str:
        return "OPEN"


OPEN = _Open()


class Range(Expr):
    """low <(=) field <(=) high; an OPEN side is unbounded."""

    def __init__(self, path: tuple, low: Any, high: Any, include_low: bool, include_high: bool) -> None:
        self.path, self.low, self.high = path, low, high
        self.include_low, self.include_high = include_low, include_high

    def matches(self, record: Any) -> bool:
        found = field_value(record, self.path)
        if found is MISSING:
            return False
        try:
            if self.low is not OPEN and not (found >= self.low if self.include_low else found > self.low):
                return False
            return self.high is OPEN or bool(found <= self.high if self.include_high else found < self.high)
        except TypeError:
            return False

    def bounds(self) -> tuple[Any, Any]:
        """(low, high) with None for an open side, as index.py takes them."""
        return (None if self.low is OPEN else self.low), (None if self.high is OPEN else self.high)

    def __repr__(self) -> str:
        low = "" if self.low is OPEN else f"{self.low!r} {'<=' if self.include_low else '<'} "
        high = "" if self.high is OPEN else f" {'<=' if self.include_high else '<'} {self.high!r}"
        return f"{low}{_name(self.path)}{high}"


class In(Expr):
    """field equals one of values."""

    def __init__(self, path: tuple, values: tuple) -> None:
        self.path, self.values = path, values

    def matches(self, record: Any) -> bool:
        found = field_value(record, self.path)
        return found is not MISSING and any(_equal(found, value) for value in self.values)

    def __repr__(self) -> str:
        return f"{_name(self.path)} in {list(self.values)!r}"


class Contains(Expr):
    """field is a list, tuple or set holding value."""

    def __init__(self, path: tuple, value: Any) -> None:
        self.path, self.value = path, value

    def matches(self, record: Any) -> bool:
        found = field_value(record, self.path)
        if isinstance(found, (list, tuple, set, frozenset)) or getattr(found, "_index_elements_", False):
            try:
                return self.value in found
            except TypeError:
                return False
        return False

    def __repr__(self) -> str:
        return f"{self.value!r} in {_name(self.path)}"


class And(Expr):
    def __init__(self, parts: list[Expr]) -> None:
        self.parts = parts

    def matches(self, record: Any) -> bool:
        return all(part.matches(record) for part in self.parts)

    def __repr__(self) -> str:
        return " & ".join(f"({part!r})" for part in self.parts)


class Or(Expr):
    def __init__(self, parts: list[Expr]) -> None:
        self.parts = parts

    def matches(self, record: Any) -> bool:
        return any(part.matches(record) for part in self.parts)

    def __repr__(self) -> str:
        return " | ".join(f"({part!r})" for part in self.parts)


class Not(Expr):
    def __init__(self, part: Expr) -> None:
        self.part = part

    def matches(self, record: Any) -> bool:
        return not self.part.matches(record)

    def __repr__(self) -> str:
        return f"~({self.part!r})"


class Everything(Expr):
    def matches(self, record: Any) -> bool:
        return True

    def __repr__(self) -> str:
        return "everything"


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except TypeError:
        return False


def _name(path: tuple) -> str:
    return ".".join(str(segment) for segment in path)


class Field:
    """A field of the records: `F.city`, `F.address.city`, `F["odd key"]`."""

    __slots__ = ("path",)

    def __init__(self, path: tuple) -> None:
        self.path = path

    def __getattr__(self, name: str) -> Field:
        if name.startswith("__"):
            raise AttributeError(name)
        return Field(self.path + (name,))

    def __getitem__(self, name: Any) -> Field:
        return Field(self.path + (name,))

    def __eq__(self, value: object) -> Expr:  # type: ignore[override]
        return Compare(self.path, "==", value)

    def __ne__(self, value: object) -> Expr:  # type: ignore[override]
        return Compare(self.path, "!=", value)

    def __lt__(self, value: Any) -> Expr:
        return Range(self.path, OPEN, value, False, False)

    def __le__(self, value: Any) -> Expr:
        return Range(self.path, OPEN, value, False, True)

    def __gt__(self, value: Any) -> Expr:
        return Range(self.path, value, OPEN, False, False)

    def __ge__(self, value: Any) -> Expr:
        return Range(self.path, value, OPEN, True, False)

    def between(self, low: Any, high: Any) -> Expr:
        """low <= field <= high (a None bound matches nothing, as Python cannot compare with None)."""
        return Range(self.path, low, high, True, True)


    def isin(self, values: Iterable[Any]) -> Expr:
        """field equals one of `values`."""
        return In(self.path, tuple(values))

    def contains(self, value: Any) -> Expr:
        """field is a list, tuple or set that holds `value`."""
        return Contains(self.path, value)

    def __hash__(self) -> int:  # what `F.x in {1, 2}` asks first
        raise TypeError(f"a query field cannot be hashed: to test membership use {self!r}.isin(values), "
                        f"not `{self!r} in values`")

    def __repr__(self) -> str:
        return f"F.{_name(self.path)}"


class _FieldRoot:
    """`F.name` starts a field; see Field."""

    def __getattr__(self, name: str) -> Field:
        if name.startswith("__"):
            raise AttributeError(name)
        return Field((name,))

    def __getitem__(self, name: Any) -> Field:
        return Field((name,))

    def __repr__(self) -> str:
        return "F"


F = _FieldRoot()


# -- what a query runs over ------------------------------------------------------------


class Source:
    """A collection as the planner sees it: records, indexes, and keys changed in a transaction."""

    def __init__(self, collection: Any) -> None:
        self.collection = collection  # where records are read (TxDict: with this transaction's writes)
        base = collection
        self.changed: frozenset = frozenset()
        if isinstance(collection, TxDict):
            base = collection._base
            self.changed = collection._changed_keys()
        elif isinstance(collection, LocalDict):
            base = None
        self.indexes: dict[tuple, int] = {}  # {field path -> index tree pointer}
        self.composites: dict[tuple, tuple[int, tuple]] = {}  # {(field path, ...) -> (pointer, index name)}
        self.index_view = base if isinstance(base, IndexedTreeDict) else None
        if self.index_view is not None:
            self.access = base._store.access
            for name, ptr in base._indexes.items():
                if isinstance(name, tuple):
                    self.composites[tuple(field_path(part) for part in name)] = (ptr, name)
                else:
                    self.indexes[field_path(name)] = ptr

    def size(self) -> int:
        return len(self.collection)

    def value(self, key: Any) -> Any:
        return self.collection[key]


# -- plans ------------------------------------------------------------------------------------


class Plan:
    """A step of a query plan: it yields record keys and estimates how many.

    The estimate is computed when first asked for (by the planner choosing
    between plans, or by explain()): a query with one candidate plan never
    pays for counting.
    """

    name = "Plan"
    uses_index = True  # False when the plan reads every record

    @functools.cached_property
    def estimate(self) -> int:
        return self._count()

    def _count(self) -> int:
        raise NotImplementedError

    def keys(self, source: Source) -> set:
        raise NotImplementedError

    def describe(self) -> str:
        return ""

    def children(self) -> list[Plan]:
        return []

    def lines(self, depth: int = 0) -> list[str]:
        detail = self.describe()
        head = f"{'  ' * depth}{self.name}({detail}) ~{self.estimate} records" if detail else \
            f"{'  ' * depth}{self.name} ~{self.estimate} records"
        return [head] + [line for child in self.children() for line in child.lines(depth + 1)]


class IndexedSearchPlan(Plan):
    """Keys whose field equals one of `values` (or, for contains, holds it), from the field's index."""

    name = "IndexedSearchPlan"

    def __init__(self, source: Source, path: tuple, values: tuple, kind: int) -> None:
        self.path, self.values, self.kind = path, values, kind
        self.access, self.root = source.access, source.indexes[path]

    def _count(self) -> int:
        return sum(count_range(self.access, self.root, *equal_bounds(self.kind, value)) for value in self.values)

    def keys(self, source: Source) -> set:
        view = source.index_view
        found: set = set()
        for value in self.values:
            memo_key = (self.path, self.kind, value)
            keys = view._postings.get(memo_key)
            if keys is None:
                keys = view._postings[memo_key] = frozenset(scan_equal(self.access, self.root, self.kind, value))
            found |= keys
        return found

    def describe(self) -> str:
        test = "contains" if self.kind == ELEMENT_ENTRY else ("==" if len(self.values) == 1 else "in")
        shown = self.values[0] if len(self.values) == 1 else list(self.values)
        return f"{_name(self.path)} {test} {shown!r}"


class IndexedRangeSearchPlan(Plan):
    """Keys whose field lies in a range, from the field's index."""

    name = "IndexedRangeSearchPlan"

    def __init__(self, source: Source, expr: Range) -> None:
        self.expr = expr
        self.access, self.root = source.access, source.indexes[expr.path]

    def _count(self) -> int:
        expr = self.expr
        low, high = expr.bounds()
        return count_range(self.access, self.root, *range_bounds(low, high, expr.include_low, expr.include_high))

    def keys(self, source: Source) -> set:
        expr = self.expr
        low, high = expr.bounds()
        return set(scan_range(self.access, self.root, low, high, expr.include_low, expr.include_high))

    def describe(self) -> str:
        return repr(self.expr)


class CompositeSearchPlan(Plan):
    """Equalities on the first fields of a composite index, and maybe a range on the next one:
    one contiguous slice of the index, so exactly the matching keys are read."""

    def __init__(self, source: Source, name: tuple, root: int, prefix: list[Compare], ranged: Range | None) -> None:
        self.index_name, self.prefix, self.ranged = name, prefix, ranged
        self.name = "IndexedRangeSearchPlan" if ranged is not None else "IndexedSearchPlan"
        values = tuple(term.value for term in prefix)
        if ranged is None:
            self.bounds = composite_bounds(values)
        else:
            low, high = ranged.bounds()
            self.bounds = composite_bounds(values, low, high, ranged.include_low, ranged.include_high, ranged=True)
        self.root, self.access = root, source.access

    def _count(self) -> int:
        return count_range(self.access, self.root, *self.bounds)

    def keys(self, source: Source) -> set:
        return set(scan_between(self.access, self.root, *self.bounds))

    def describe(self) -> str:
        terms = [repr(term) for term in self.prefix] + ([repr(self.ranged)] if self.ranged is not None else [])
        return f"{' & '.join(terms)} on index ({', '.join(self.index_name)})"


class AndMerge(Plan):
    """Intersection of the children's key sets, smallest first."""

    name = "AndMerge"

    def __init__(self, parts: list[Plan]) -> None:
        self.parts = sorted(parts, key=lambda plan: plan.estimate)

    def _count(self) -> int:
        return self.parts[0].estimate

    def keys(self, source: Source) -> set:
        result = set(self.parts[0].keys(source))
        for part in self.parts[1:]:
            if not result:
                break
            result &= part.keys(source)
        return result

    def children(self) -> list[Plan]:
        return self.parts


class OrMerge(Plan):
    """Union of the children's key sets (each record once)."""

    name = "OrMerge"

    def __init__(self, parts: list[Plan], size: int) -> None:
        self.parts, self.size = parts, size

    def _count(self) -> int:
        return min(self.size, sum(part.estimate for part in self.parts))

    def keys(self, source: Source) -> set:
        result: set = set()
        for part in self.parts:
            result |= part.keys(source)
        return result

    def children(self) -> list[Plan]:
        return self.parts


class FilterPlan(Plan):
    """The records of `base` for which `predicate` holds."""

    name = "FilterPlan"

    def __init__(self, base: Plan, predicate: Expr) -> None:
        self.base, self.predicate = base, predicate
        self.uses_index = base.uses_index

    def _count(self) -> int:
        return self.base.estimate

    def keys(self, source: Source) -> set:
        predicate = self.predicate
        if isinstance(self.base, FullScanPlan):
            return {key for key, record in source.collection.items() if predicate.matches(record)}
        value = source.value
        return {key for key in self.base.keys(source) if predicate.matches(value(key))}

    def describe(self) -> str:
        return repr(self.predicate)

    def children(self) -> list[Plan]:
        return [self.base]


class FullScanPlan(Plan):
    """Every record of the collection."""

    name = "FullScanPlan"
    uses_index = False

    def __init__(self, source: Source) -> None:
        self.source = source

    def _count(self) -> int:
        return self.source.size()

    def keys(self, source: Source) -> set:
        return set(source.collection.keys())


# -- the planner ----------------------------------------------------------------------------


def plan(expr: Expr, source: Source) -> Plan:
    """The cheapest plan the planner knows for `expr` over `source`."""
    if isinstance(expr, Everything):
        return FullScanPlan(source)
    indexed = _index_term(expr, source)
    if indexed is not None:
        return indexed
    # (A lone term never covers a composite index: those have two fields or more.)
    if isinstance(expr, And):
        return _plan_and(expr, source)
    if isinstance(expr, Or):
        parts = [plan(part, source) for part in expr.parts]
        if all(part.uses_index for part in parts):
            return OrMerge(parts, source.size())
    return FilterPlan(FullScanPlan(source), expr)


def _plan_and(expr: And, source: Source) -> Plan:
    parts = list(expr.parts)
    planned = []
    composite = _composite_term(parts, source)
    if composite is not None:
        subplan, used = composite
        planned.append((used[0] if len(used) == 1 else And(used), subplan))
        parts = [part for part in parts if not any(part is other for other in used)]
    planned += [(part, plan(part, source)) for part in parts]
    keyed = [pair for pair in planned if pair[1].uses_index]
    rest = [part for part, subplan in planned if not subplan.uses_index]
    if not keyed:
        return FilterPlan(FullScanPlan(source), expr)
    merged = [keyed[0][1]]
    if len(keyed) > 1:  # only now are the estimates worth counting
        keyed.sort(key=lambda pair: pair[1].estimate)
        limit = PROBE_FACTOR * max(keyed[0][1].estimate, 1)
        merged = [subplan for _, subplan in keyed if subplan.estimate <= limit]
        rest += [part for part, subplan in keyed if subplan.estimate > limit]

    base = merged[0] if len(merged) == 1 else AndMerge(merged)
    if not rest:
        return base
    return FilterPlan(base, rest[0] if len(rest) == 1 else And(rest))


def _index_term(expr: Expr, source: Source) -> Plan | None:
    """An index plan for a single term on an indexed field, or None."""
    path = getattr(expr, "path", None)
    if path not in source.indexes:
        return None
    if isinstance(expr, Compare) and expr.op == "==" and is_key(expr.value):
        return IndexedSearchPlan(source, path, (expr.value,), VALUE_ENTRY)
    if isinstance(expr, In) and all(is_key(value) for value in expr.values):
        return IndexedSearchPlan(source, path, _distinct(expr.values), VALUE_ENTRY)
    if isinstance(expr, Contains) and is_key(expr.value):
        return IndexedSearchPlan(source, path, (expr.value,), ELEMENT_ENTRY)
    if isinstance(expr, Range) and _range_indexable(expr):
        return IndexedRangeSearchPlan(source, expr)
    return None


def _composite_term(parts: list[Expr], source: Source) -> tuple[Plan, list[Expr]] | None:
    """A composite index whose every field the terms constrain (equalities, the last maybe a range), or None."""

    best: tuple[tuple, int, list[Compare], Range | None] | None = None
    for fields, (root, name) in source.composites.items():
        prefix: list[Compare] = []
        ranged = None
        for path in fields:
            equal = next((part for part in parts if isinstance(part, Compare) and part.op == "=="
                          and part.path == path and is_key(part.value)), None)
            if equal is not None:
                prefix.append(equal)
                continue
            ranged = next((part for part in parts if isinstance(part, Range) and part.path == path
                           and _range_indexable(part)), None)
            break
        # A record lacking any field of the index has no entry in it, yet may match a
        # query that leaves that field free: only a query constraining every field may use it.
        covered = len(prefix) + (ranged is not None)
        if covered == len(fields) and (best is None or covered > len(best[2]) + (best[3] is not None)):
            best = (name, root, prefix, ranged)
    if best is None:
        return None
    name, root, prefix, ranged = best
    used: list[Expr] = [*prefix, *([ranged] if ranged is not None else [])]
    return CompositeSearchPlan(source, name, root, prefix, ranged), used


def _distinct(values: tuple) -> tuple:
    seen: list = []
    for value in values:
        if not any(_equal(value, other) for other in seen):
            seen.append(value)
    return tuple(seen)


def _range_indexable(expr: Range) -> bool:
    bounds = [bound for bound in (expr.low, expr.high) if bound is not OPEN]
    if not bounds or not all(is_key(bound) for bound in bounds) or any(type(b) is bool for b in bounds):
        return False
    return len({order_key(bound)[0] for bound in bounds}) == 1 and order_key(bounds[0])[0] != 0


# -- results ----------------------------------------------------------------------------------


class Query:
    """The records of a collection matching a condition; lazy until read."""

    def __init__(self, collection: Any, expr: Expr | None = None) -> None:
        if expr is not None and not isinstance(expr, Expr):
            raise TypeError(f"where() takes a condition built from F, e.g. F.city == 'Paris'; got {expr!r}")
        self._source = Source(collection)
        self._expr = expr if expr is not None else Everything()
        self._plan = plan(self._expr, self._source)
        self._order: tuple[tuple, bool] | None = None
        self._limit: int | None = None

    @property
    def plan(self) -> Plan:
        """The plan tree (see explain)."""
        return self._plan

    def explain(self) -> str:
        """The plan as an indented tree of plan nodes with their estimated sizes."""
        lines = self._plan.lines()
        if self._source.changed:
            lines.append(f"+ {len(self._source.changed)} keys changed in this transaction, checked directly")
        if self._order is not None:
            lines.append(f"then order by {_name(self._order[0])}{' descending' if self._order[1] else ''}")
        if self._limit is not None:
            lines.append(f"then limit {self._limit}")
        return "\n".join(lines)

    def _keys(self) -> list:
        source = self._source
        found = self._plan.keys(source)
        if source.changed and self._plan.uses_index:
            found = {key for key in found if key not in source.changed}
            found.update(key for key in source.changed
                         if key in source.collection and self._expr.matches(source.collection[key]))
        keys = list(found)
        if self._order is not None:
            path, descending = self._order
            value = source.value
            ranked = [(_sort_key(field_value(value(key), path)), key) for key in keys]
            # Records lacking the field (or with an unorderable value) come last either way.
            present = [pair for pair in ranked if pair[0][0] == 0]
            present.sort(key=lambda pair: pair[0], reverse=descending)
            keys = [key for _, key in present] + [key for rank, key in ranked if rank[0] != 0]
        if self._limit is not None:
            keys = keys[:self._limit]
        return keys

    def keys(self) -> list:
        """Keys of the matching records (in no particular order unless order_by was given)."""
        return self._keys()

    def __iter__(self) -> Iterator[Any]:
        value = self._source.value
        return (value(key) for key in self._keys())

    def items(self) -> list[tuple[Any, Any]]:
        value = self._source.value
        return [(key, value(key)) for key in self._keys()]

    def count(self) -> int:
        """How many records match; from key sets alone when the plan allows."""
        return len(self._keys())

    def first(self) -> Any:
        """The first matching record (by order_by when given), or None."""
        for record in self.limit(1):
            return record
        return None

    def order_by(self, field: str | tuple, descending: bool = False) -> Query:
        query = self._copy()
        query._order = (field_path(field), descending)
        return query

    def limit(self, count: int) -> Query:
        if count < 0:
            raise ValueError(f"limit must be >= 0, got {count}")
        query = self._copy()
        query._limit = count
        return query

    def _copy(self) -> Query:
        query = object.__new__(Query)
        query.__dict__.update(self.__dict__)
        return query

    def _values(self, field: str | tuple) -> list[Any]:
        path = field_path(field)
        found = (field_value(record, path) for record in self)
        return [value for value in found if value is not MISSING]

    def sum(self, field: str | tuple) -> Any:
        return _sum(self._values(field), field)

    def min(self, field: str | tuple) -> Any:
        return _extreme(self._values(field), min)

    def max(self, field: str | tuple) -> Any:
        return _extreme(self._values(field), max)

    def avg(self, field: str | tuple) -> Any:
        values = self._values(field)
        return _sum(values, field) / len(values) if values else None

    def group_by(self, field: str | tuple) -> Grouped:
        """Aggregates per value of `field`: `.count()`, `.sum(f)`, `.min(f)`, `.max(f)`, `.avg(f)`."""
        return Grouped(self, field_path(field))

    def __repr__(self) -> str:
        return f"<Query {self._expr!r}>"


class Grouped:
    """A query's records grouped by one field (records lacking it are left out)."""

    def __init__(self, query: Query, path: tuple) -> None:
        self._query, self._path = query, path

    def _groups(self) -> dict[Any, list]:
        groups: dict[Any, list] = {}
        for record in self._query:
            group = field_value(record, self._path)
            if group is not MISSING:
                groups.setdefault(_hashable(group), []).append(record)
        return groups

    def _aggregate(self, field: str | tuple, combine: Callable[[list], Any]) -> dict[Any, Any]:
        path = field_path(field)
        result = {}
        for group, records in self._groups().items():
            values = [value for value in (field_value(r, path) for r in records) if value is not MISSING]
            result[group] = combine(values)
        return result

    def count(self) -> dict[Any, int]:
        return {group: len(records) for group, records in self._groups().items()}

    def sum(self, field: str | tuple) -> dict[Any, Any]:
        return self._aggregate(field, lambda values: _sum(values, field))

    def min(self, field: str | tuple) -> dict[Any, Any]:
        return self._aggregate(field, lambda values: _extreme(values, min))

    def max(self, field: str | tuple) -> dict[Any, Any]:
        return self._aggregate(field, lambda values: _extreme(values, max))

    def avg(self, field: str | tuple) -> dict[Any, Any]:
        return self._aggregate(field, lambda values: _sum(values, field) / len(values) if values else None)


def _sum(values: list, field: Any) -> Any:
    try:
        return sum(values)
    except TypeError:
        kinds = sorted({type(value).__name__ for value in values})
        raise TypeError(f"cannot sum field {field!r}: it holds {', '.join(kinds)} values; "
                        f"filter the query to numeric records first") from None


def _extreme(values: list, pick: Callable) -> Any:
    keys = [value for value in values if is_key(value)]
    return pick(keys, key=order_key) if keys else None


def _sort_key(value: Any) -> tuple:
    if value is MISSING or not is_key(value):
        return (1,)
    return (0, order_key(value))


def _hashable(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value

