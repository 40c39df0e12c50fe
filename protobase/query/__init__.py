"""Queries: `F` expressions, the planner, its plans and query results.

Runs in whichever process queries (a client, a pool worker). The planner reads
collections only through the `QuerySource` protocol they implement.
"""

from protobase.query.planner import (
    AndMerge,
    Expr,
    F,
    FilterPlan,
    FullScanPlan,
    Grouped,
    IndexedRangeSearchPlan,
    IndexedSearchPlan,
    OrMerge,
    Plan,
    Query,
)

__all__ = ["F", "Expr", "Query", "Plan", "IndexedSearchPlan", "IndexedRangeSearchPlan", "AndMerge", "OrMerge",
           "FilterPlan", "FullScanPlan", "Grouped"]
