"""The planner: turns a condition into the cheapest plan it knows over a collection's indexes.

Owns the choice of plans (see plans.py for what each does):

* a term on an indexed field (equality, `isin`, `contains`, a range of one
  type family) reads that index;
* an `&` of terms uses a composite index whose every field the terms
  constrain (equalities, the last maybe a range), intersects the indexed
  terms of comparable sizes, and checks the rest on the candidates: an
  indexed term whose key set is more than PROBE_FACTOR times the smallest is
  cheaper to probe on those few records than to scan;
* an `|` of terms merges them when every term uses an index;
* anything else filters a full scan.

Estimates come from the index readers' counts (O(log n) per term), and only
when two plans compete, so planning never scans.

Runs in whichever process queries; reads the collection only through
`QuerySource.query_indexes()`. Invariant: a plan yields exactly the keys
whose records `expr.matches`, whatever the indexes (tests check it against a
comprehension).
"""

from __future__ import annotations

from typing import Any, Final

from protobase.keyorder import is_key, order_key
from protobase.query.expressions import OPEN, And, Compare, Contains, Everything, Expr, In, Or, Range, values_equal
from protobase.query.fields import FieldPath, field_path
from protobase.query.plans import (
    AndMerge,
    CompositeSearchPlan,
    FilterPlan,
    FullScanPlan,
    IndexedRangeSearchPlan,
    IndexedSearchPlan,
    OrMerge,
    Plan,
)
from protobase.query.source import IndexReader, QuerySource

__all__ = ["plan", "Planner", "PROBE_FACTOR"]

PROBE_FACTOR: Final = 8  # probe records instead of scanning an index range this many times larger


def plan(expr: Expr, source: QuerySource) -> Plan:
    """The cheapest plan the planner knows for `expr` over `source`."""
    return Planner(source).plan(expr)


class Planner:
    """Plans conditions over one collection, whose indexes it reads once, keyed by field path."""

    def __init__(self, source: QuerySource) -> None:
        self.source = source
        self.single: dict[FieldPath, IndexReader] = {}  # {field path -> reader of its index}
        # {(field path, ...) -> (reader, index name)} of the composite indexes
        self.composite: dict[tuple[FieldPath, ...], tuple[IndexReader, tuple[str, ...]]] = {}
        for name, reader in source.query_indexes().items():
            if isinstance(name, tuple):
                self.composite[tuple(field_path(part) for part in name)] = (reader, name)
            else:
                self.single[field_path(name)] = reader

    def plan(self, expr: Expr) -> Plan:
        """The cheapest plan the planner knows for `expr`."""
        source = self.source
        if isinstance(expr, Everything):
            return FullScanPlan(source)
        indexed = self._index_term(expr)
        if indexed is not None:
            return indexed
        # (A lone term never covers a composite index: those have two fields or more.)
        if isinstance(expr, And):
            return self._plan_and(expr)
        if isinstance(expr, Or):
            parts = [self.plan(part) for part in expr.parts]
            if all(part.uses_index for part in parts):
                return OrMerge(parts, len(source))
        return FilterPlan(FullScanPlan(source), expr)

    def _plan_and(self, expr: And) -> Plan:
        parts = list(expr.parts)
        planned: list[tuple[Expr, Plan]] = []
        composite = self._composite_term(parts)
        if composite is not None:
            subplan, used = composite
            planned.append((used[0] if len(used) == 1 else And(used), subplan))
            parts = [part for part in parts if not any(part is other for other in used)]
        planned += [(part, self.plan(part)) for part in parts]
        keyed = [pair for pair in planned if pair[1].uses_index]
        rest = [part for part, subplan in planned if not subplan.uses_index]
        if not keyed:
            return FilterPlan(FullScanPlan(self.source), expr)
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

    def _index_term(self, expr: Expr) -> Plan | None:
        """An index plan for a single term on an indexed field, or None."""
        path = getattr(expr, "path", None)  # the field a single term tests (And, Or, Not have none)
        index = self.single.get(path) if path is not None else None
        if index is None:
            return None
        if isinstance(expr, Compare) and expr.op == "==" and is_key(expr.value):
            return IndexedSearchPlan(index, expr.path, (expr.value,))
        if isinstance(expr, In) and all(is_key(value) for value in expr.values):
            return IndexedSearchPlan(index, expr.path, _distinct(expr.values))
        if isinstance(expr, Contains) and is_key(expr.value):
            return IndexedSearchPlan(index, expr.path, (expr.value,), contains=True)
        if isinstance(expr, Range) and _range_indexable(expr):
            return IndexedRangeSearchPlan(index, expr)
        return None

    def _composite_term(self, parts: list[Expr]) -> tuple[Plan, list[Expr]] | None:
        """A composite index whose every field the terms constrain (equalities, the last maybe a range), or None."""
        best: tuple[tuple[str, ...], IndexReader, list[Compare], Range | None] | None = None
        for fields, (index, name) in self.composite.items():
            prefix: list[Compare] = []
            ranged = None
            for path in fields:
                equal = next(
                    (
                        part
                        for part in parts
                        if isinstance(part, Compare) and part.op == "==" and part.path == path and is_key(part.value)
                    ),
                    None,
                )
                if equal is not None:
                    prefix.append(equal)
                    continue
                ranged = next(
                    (
                        part
                        for part in parts
                        if isinstance(part, Range) and part.path == path and _range_indexable(part)
                    ),
                    None,
                )
                break
            # A record lacking any field of the index has no entry in it, yet may match a
            # query that leaves that field free: only a query constraining every field may use it.
            covered = len(prefix) + (ranged is not None)
            if covered == len(fields) and (best is None or covered > len(best[2]) + (best[3] is not None)):
                best = (name, index, prefix, ranged)
        if best is None:
            return None
        name, index, prefix, ranged = best
        used: list[Expr] = [*prefix, *([ranged] if ranged is not None else [])]
        return CompositeSearchPlan(index, name, prefix, ranged), used


def _distinct(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """`values` without repeats (by ==, first kept): `isin([1, 1])` reads the index once."""
    seen: list[Any] = []
    for value in values:
        if not any(values_equal(value, other) for other in seen):
            seen.append(value)
    return tuple(seen)


def _range_indexable(expr: Range) -> bool:
    """Whether an index can answer the range: key bounds (not bool, not None) of one type family."""
    bounds = [bound for bound in (expr.low, expr.high) if bound is not OPEN]
    if not bounds or not all(is_key(bound) for bound in bounds) or any(type(b) is bool for b in bounds):
        return False
    return len({order_key(bound)[0] for bound in bounds}) == 1 and order_key(bounds[0])[0] != 0
