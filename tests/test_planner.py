"""The planner through its protocols: `QuerySource` and `IndexReader` are all it needs.

A fake source (a dict) with fake index readers (over the same records,
counting their calls) shows the choices the planner makes from the readers'
counts alone: a single plan is never counted, a term more than PROBE_FACTOR
times larger than the smallest is probed rather than scanned, a composite
index is used only when every field is constrained, and keys the source
reports changed are checked against their current records. Then every
collection type of a real database is checked to be a QuerySource, and its
index readers to count exactly what they return.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

from protobase import F
from protobase.core.frozen import freeze
from protobase.query import IndexReader, QuerySource
from protobase.query.expressions import Expr
from protobase.query.fields import MISSING, field_path, field_value
from protobase.query.planner import PROBE_FACTOR, plan
from protobase.query.plans import AndMerge, CompositeSearchPlan, FilterPlan, FullScanPlan, IndexedSearchPlan
from protobase.query.results import Query
from protobase.query.source import NO_INDEXES, IndexName, Interval
from tests.conftest import open_test_db


class FakeIndex:
    """An IndexReader over a dict of records, by brute force, recording each call."""

    def __init__(self, records: Mapping[Any, Any], name: IndexName) -> None:
        self.records, self.calls = dict(records), list[Any]()
        self.paths = [field_path(part) for part in name] if isinstance(name, tuple) else [field_path(name)]

    def _value(self, record: Any) -> Any:
        values = [field_value(record, path) for path in self.paths]
        return values[0] if len(values) == 1 else tuple(values)

    def _equal(self, value: Any, element: bool) -> frozenset[Any]:
        found = {key: self._value(record) for key, record in self.records.items()}
        if element:
            return frozenset(key for key, held in found.items() if isinstance(held, list) and value in held)
        return frozenset(key for key, held in found.items() if held is not MISSING and held == value)

    def _in(self, value: Any, interval: Interval) -> bool:
        low, high, include_low, include_high = interval
        if value is MISSING or type(value) is not type(low if low is not None else high):
            return False
        return (low is None or (value >= low if include_low else value > low)) and (
            high is None or (value <= high if include_high else value < high)
        )

    def count_equal(self, value: Any, *, element: bool = False) -> int:
        self.calls.append("count_equal")
        return len(self._equal(value, element))

    def keys_equal(self, value: Any, *, element: bool = False) -> Set[Any]:
        self.calls.append("keys_equal")
        return self._equal(value, element)

    def count_range(self, interval: Interval) -> int:
        self.calls.append("count_range")
        return len(self._range(interval))

    def keys_range(self, interval: Interval) -> list[Any]:
        self.calls.append("keys_range")
        return self._range(interval)

    def _range(self, interval: Interval) -> list[Any]:
        return [key for key, record in self.records.items() if self._in(self._value(record), interval)]

    def _prefix(self, prefix: tuple[Any, ...], ranged: Interval | None) -> list[Any]:
        found = []
        for key, record in self.records.items():
            values = self._value(record)
            if MISSING in values or values[: len(prefix)] != prefix:
                continue
            if ranged is None or self._in(values[len(prefix)], ranged):
                found.append(key)
        return found

    def count_prefix(self, prefix: tuple[Any, ...], ranged: Interval | None = None) -> int:
        self.calls.append("count_prefix")
        return len(self._prefix(prefix, ranged))

    def keys_prefix(self, prefix: tuple[Any, ...], ranged: Interval | None = None) -> list[Any]:
        self.calls.append(("keys_prefix", prefix, ranged))
        return self._prefix(prefix, ranged)


class FakeSource(dict[Any, Any]):
    """A QuerySource: the records as a dict, the given readers, the given changed keys."""

    def __init__(
        self,
        records: Mapping[Any, Any],
        indexes: Mapping[IndexName, IndexReader],
        changed: frozenset[Any] = frozenset(),
    ) -> None:
        super().__init__(records)
        self.indexes, self.changed = indexes, changed

    def query_indexes(self) -> Mapping[IndexName, IndexReader]:
        return self.indexes

    def query_changed_keys(self) -> frozenset[Any]:
        return self.changed


RECORDS = {f"k{i}": {"city": "a" if i < 10 else "b", "score": i, "tags": ["x"] if i % 2 else []} for i in range(100)}


def indexed(*names: IndexName) -> tuple[FakeSource, dict[IndexName, FakeIndex]]:
    readers = {name: FakeIndex(RECORDS, name) for name in names}
    return FakeSource(RECORDS, readers), readers


def expected(expr: Expr) -> set[Any]:
    return {key for key, record in RECORDS.items() if expr.matches(record)}


def test_fakes_satisfy_the_protocols() -> None:
    source, readers = indexed("city")
    assert isinstance(source, QuerySource) and isinstance(readers["city"], IndexReader)
    assert not isinstance(dict(RECORDS), QuerySource)  # a plain dict lacks query_indexes


def test_a_lone_plan_is_never_counted() -> None:
    source, readers = indexed("city", "tags")
    query = Query(source, F.city == "a")
    assert type(query.plan) is IndexedSearchPlan
    assert set(query.keys()) == expected(F.city == "a")
    assert readers["city"].calls == ["keys_equal"]  # no count: nothing to choose between
    assert query.explain() == "IndexedSearchPlan(city == 'a') ~10 records"
    assert readers["city"].calls[-1] == "count_equal"
    assert readers["tags"].calls == []


def test_a_term_larger_than_probe_factor_times_the_smallest_is_probed() -> None:
    source, _ = indexed("city", "score")
    small = F.city == "a"  # 10 records
    at_limit = F.score < 10 * PROBE_FACTOR  # 80 records: intersected
    beyond = F.score < 10 * PROBE_FACTOR + 1  # 81 records: checked on the 10 candidates
    merged = plan(small & at_limit, source)
    assert type(merged) is AndMerge and [part.estimate for part in merged.parts] == [10, 80]
    probed = plan(small & beyond, source)
    assert type(probed) is FilterPlan and type(probed.base) is IndexedSearchPlan
    assert repr(probed.predicate) == "score < 81"
    for expr in (small & at_limit, small & beyond):
        assert set(Query(source, expr).keys()) == expected(expr)


def test_a_composite_index_is_used_only_when_every_field_is_constrained() -> None:
    source, readers = indexed(("city", "score"))
    composite = readers[("city", "score")]
    expr = (F.city == "b") & (F.score > 90) & F.tags.contains("x")
    query = Query(source, expr)
    assert type(query.plan) is FilterPlan and type(query.plan.base) is CompositeSearchPlan
    assert set(query.keys()) == expected(expr)
    assert composite.calls == [("keys_prefix", ("b",), Interval(90, None, False, False))]
    assert query.explain().splitlines() == [
        "FilterPlan('x' in tags) ~9 records",
        "  IndexedRangeSearchPlan(city == 'b' & 90 < score on index (city, score)) ~9 records",
    ]
    # city alone leaves score free: records lacking score are in no composite entry, so no index
    alone = plan(F.city == "b", source)
    assert isinstance(alone, FilterPlan) and type(alone.base) is FullScanPlan


def test_changed_keys_are_checked_against_their_current_records() -> None:
    stale = {**RECORDS, "k0": {"city": "b", "score": 0}}  # what the index still says of k0
    readers: dict[IndexName, IndexReader] = {"city": FakeIndex(stale, "city")}
    source = FakeSource({**RECORDS, "new": {"city": "a"}}, readers, changed=frozenset({"k0", "k1", "new", "gone"}))
    query = Query(source, F.city == "a")
    assert set(query.keys()) == expected(F.city == "a") | {"new"}
    assert query.explain().splitlines()[-1] == "+ 4 keys changed in this transaction, checked directly"
    # a full scan reads the current records anyway: nothing to recheck
    assert set(Query(source, F.score == 1).keys()) == {"k1"}


def test_every_collection_is_a_query_source_whose_readers_count_what_they_return(datadir: str) -> None:
    frozen = freeze({"a": {"city": "x"}})
    assert isinstance(frozen, QuerySource) and frozen.query_indexes() is NO_INDEXES
    records = {f"k{i}": {"city": f"c{i % 3}", "score": i, "tags": [i % 2]} for i in range(300)}

    def count(predicate: Any) -> int:
        return sum(1 for record in records.values() if predicate(record))

    with open_test_db(datadir, durability="async") as db:
        with db.transaction() as tx:
            tx.root["plain"] = dict(records)
            tx.root["users"] = dict(records)
        with db.transaction() as tx:
            tx.root["users"].create_index("city")
            tx.root["users"].create_index("tags")
            tx.root["users"].create_index("city", "score")
        tx = db.transaction()
        try:
            tx.root["local"] = {"k": {"city": "x"}}
            tx.root["users"]["k0"] = {"city": "c9"}
            written, local = tx.root["users"], tx.root["local"]
            assert isinstance(written, QuerySource) and isinstance(local, QuerySource)
            assert local.query_indexes() is NO_INDEXES
            assert written.query_changed_keys() == {"k0"}
        finally:
            tx.abort()
        with db.snapshot() as snap:
            plain, users = snap.root["plain"], snap.root["users"]
            assert isinstance(plain, QuerySource) and plain.query_indexes() is NO_INDEXES
            readers = users.query_indexes()
            assert readers is users.query_indexes() and set(readers) == {"city", "tags", ("city", "score")}
            city, tags, pair = readers["city"], readers["tags"], readers[("city", "score")]
            found = city.keys_equal("c1")
            assert city.count_equal("c1") == len(found) == count(lambda r: r["city"] == "c1")
            assert city.keys_equal("c1") is found  # memoised by the view
            assert tags.count_equal(1, element=True) == len(tags.keys_equal(1, element=True)) == 150
            assert tags.count_equal(1) == len(tags.keys_equal(1)) == 0  # a list value is not itself an entry
            interval = Interval(None, "c1", False, True)
            assert city.count_range(interval) == len(list(city.keys_range(interval))) == 200
            ranged = Interval(100, 200, True, False)
            assert (
                pair.count_prefix(("c1",), ranged)
                == len(list(pair.keys_prefix(("c1",), ranged)))
                == count(lambda r: r["city"] == "c1" and 100 <= r["score"] < 200)
            )
            assert pair.count_prefix(("c1",)) == len(list(pair.keys_prefix(("c1",)))) == 100
