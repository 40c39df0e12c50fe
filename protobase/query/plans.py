"""Query plans: trees of steps that each yield record keys and estimate how many.

Owns how a chosen plan runs and how explain() prints it:

* `IndexedSearchPlan`: equality, membership (`isin`) or `contains` on an
  indexed field: the keys come straight from the index;
* `IndexedRangeSearchPlan`: `<`, `<=`, `>`, `>=`, `between` on an indexed field;
* `CompositeSearchPlan`: equalities on the first fields of a composite index
  and maybe a range on the next (shown as one of the two above);
* `AndMerge`: intersection of key sets, smallest first;
* `OrMerge`: union of key sets (a record key names one AtomPointer in a
  snapshot, so deduplicating keys deduplicates records);
* `FilterPlan`: a predicate checked on the records of a base plan;
* `FullScanPlan`: every record, the last resort.

Runs in whichever process queries. Plans read indexes only through
`IndexReader` and records only through `QuerySource`. Invariant: `keys()`
returns a new set the caller may change, and an index plan's estimate is the
exact size of its key set (a merge's is a bound).
"""

from __future__ import annotations

import functools
from typing import Any

from protobase.query.expressions import Compare, Expr, Range
from protobase.query.fields import FieldPath, field_name
from protobase.query.source import IndexReader, Interval, QuerySource

__all__ = [
    "Plan",
    "IndexedSearchPlan",
    "IndexedRangeSearchPlan",
    "CompositeSearchPlan",
    "AndMerge",
    "OrMerge",
    "FilterPlan",
    "FullScanPlan",
]


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
        """How many keys the plan yields (exact for one index term, an upper bound for merges)."""
        return self._count()

    def _count(self) -> int:
        raise NotImplementedError

    def keys(self, source: QuerySource) -> set[Any]:
        """The keys of the matching records of `source`, as a new set."""
        raise NotImplementedError

    def describe(self) -> str:
        """What the step does, for explain() ("" when its name says it)."""
        return ""

    def children(self) -> list[Plan]:
        """The steps this one combines."""
        return []

    def lines(self, depth: int = 0) -> list[str]:
        """explain()'s lines for this subtree, indented by `depth`."""
        detail = self.describe()
        head = (
            f"{'  ' * depth}{self.name}({detail}) ~{self.estimate} records"
            if detail
            else f"{'  ' * depth}{self.name} ~{self.estimate} records"
        )
        return [head] + [line for child in self.children() for line in child.lines(depth + 1)]


class IndexedSearchPlan(Plan):
    """Keys whose field equals one of `values` (or, for contains, holds it), from the field's index."""

    name = "IndexedSearchPlan"

    def __init__(self, index: IndexReader, path: FieldPath, values: tuple[Any, ...], contains: bool = False) -> None:
        self.index, self.path, self.values, self.contains = index, path, values, contains

    def _count(self) -> int:
        index, element = self.index, self.contains
        return sum(index.count_equal(value, element=element) for value in self.values)

    def keys(self, source: QuerySource) -> set[Any]:
        index, element = self.index, self.contains
        found: set[Any] = set()
        for value in self.values:
            found |= index.keys_equal(value, element=element)
        return found

    def describe(self) -> str:
        test = "contains" if self.contains else ("==" if len(self.values) == 1 else "in")
        shown = self.values[0] if len(self.values) == 1 else list(self.values)
        return f"{field_name(self.path)} {test} {shown!r}"


def _interval(expr: Range) -> Interval:
    low, high = expr.bounds()
    return Interval(low, high, expr.include_low, expr.include_high)


class IndexedRangeSearchPlan(Plan):
    """Keys whose field lies in a range, from the field's index."""

    name = "IndexedRangeSearchPlan"

    def __init__(self, index: IndexReader, expr: Range) -> None:
        self.index, self.expr = index, expr

    def _count(self) -> int:
        return self.index.count_range(_interval(self.expr))

    def keys(self, source: QuerySource) -> set[Any]:
        return set(self.index.keys_range(_interval(self.expr)))

    def describe(self) -> str:
        return repr(self.expr)


class CompositeSearchPlan(Plan):
    """Equalities on the first fields of a composite index, and maybe a range on the next one:
    one contiguous slice of the index, so exactly the matching keys are read."""

    def __init__(
        self, index: IndexReader, index_name: tuple[str, ...], prefix: list[Compare], ranged: Range | None
    ) -> None:
        self.index, self.index_name, self.prefix, self.ranged = index, index_name, prefix, ranged
        self.name = "IndexedRangeSearchPlan" if ranged is not None else "IndexedSearchPlan"
        self.values = tuple(term.value for term in prefix)
        self.interval = _interval(ranged) if ranged is not None else None

    def _count(self) -> int:
        return self.index.count_prefix(self.values, self.interval)

    def keys(self, source: QuerySource) -> set[Any]:
        return set(self.index.keys_prefix(self.values, self.interval))

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

    def keys(self, source: QuerySource) -> set[Any]:
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
        self.parts, self.size = parts, size  # size: the collection's, which bounds the estimate

    def _count(self) -> int:
        return min(self.size, sum(part.estimate for part in self.parts))

    def keys(self, source: QuerySource) -> set[Any]:
        result: set[Any] = set()
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

    def keys(self, source: QuerySource) -> set[Any]:
        predicate = self.predicate
        if isinstance(self.base, FullScanPlan):
            return {key for key, record in source.items() if predicate.matches(record)}
        # Keys from an index are the snapshot's: a key this transaction changed may be gone from
        # the records, and Query rechecks those keys on their current values anyway.
        changed = source.query_changed_keys()
        value = source.__getitem__
        return {key for key in self.base.keys(source) if key not in changed and predicate.matches(value(key))}

    def describe(self) -> str:
        return repr(self.predicate)

    def children(self) -> list[Plan]:
        return [self.base]


class FullScanPlan(Plan):
    """Every record of the collection."""

    name = "FullScanPlan"
    uses_index = False

    def __init__(self, source: QuerySource) -> None:
        self.source = source

    def _count(self) -> int:
        return len(self.source)

    def keys(self, source: QuerySource) -> set[Any]:
        return set(source.keys())
