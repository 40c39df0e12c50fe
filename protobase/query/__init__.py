"""Queries: `F` expressions, the planner, its plans and query results.

`collection.where(expr)` returns a `Query`. The modules, bottom-up:

* fields.py: field paths ("address.city") and a record's value at one (MISSING);
* expressions.py: `F` and the `Expr` tree it builds, with the reference semantics;
* source.py: the `QuerySource` and `IndexReader` protocols collections implement;
* plans.py: plan nodes, which yield keys and print in explain();
* planner.py: the choice of a plan for a condition over a source's indexes;
* results.py: `Query`, ordering, limits, aggregates and `Grouped`.

Runs in whichever process queries (a client, a pool worker). Imports nothing of
ProtoBase above errors and keyorder: the collections depend on this package,
never the reverse, and the planner reads them only through `QuerySource`.
"""

from protobase.query.expressions import Expr, F
from protobase.query.plans import (
    AndMerge,
    FilterPlan,
    FullScanPlan,
    IndexedRangeSearchPlan,
    IndexedSearchPlan,
    OrMerge,
    Plan,
)
from protobase.query.results import Grouped, Query
from protobase.query.source import IndexReader, QuerySource

__all__ = [
    "F",
    "Expr",
    "Query",
    "Plan",
    "IndexedSearchPlan",
    "IndexedRangeSearchPlan",
    "AndMerge",
    "OrMerge",
    "FilterPlan",
    "FullScanPlan",
    "Grouped",
    "QuerySource",
    "IndexReader",
]
