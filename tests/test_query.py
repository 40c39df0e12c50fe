"""Queries against a Python model: `where` returns what a comprehension returns.

Random records (fields sometimes missing, values of mixed types, tuples,
lists, sets, nested `address.city`) and random expressions (every operator,
nested & | ~) are checked against a reference predicate written here from the
documented semantics (protobase/query/), not from its code:

* a record lacking the field matches no comparison but `!=`;
* values Python cannot compare (5 < "a") do not match;
* `contains` is membership in a list, tuple or set value.

Each check runs without indexes and with indexes on some fields, on a
snapshot, inside a transaction after uncommitted updates and deletes, and
again after they commit. One database per test; each Hypothesis example uses a
fresh top-level key and deletes it at the end, so the database stays small.
"""

from __future__ import annotations

import itertools
import operator
import random
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protobase
from protobase import F
from protobase.core.frozen import freeze
from tests.conftest import open_test_db

FIELDS = ("city", "score", "tags", "address.city")
SETTINGS = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the reference semantics -------------------------------------------------------------------

ABSENT = object()  # a field the record does not have (our own marker, not protobase's)


def get(record: Any, field: str) -> Any:
    value = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return ABSENT
        value = value[part]
    return value


_OPS = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


def compare(op: str, found: Any, value: Any) -> bool:
    if found is ABSENT:
        return op == "!="
    try:
        return bool(_OPS[op](found, value))
    except TypeError:
        return False


def between(found: Any, low: Any, high: Any) -> bool:
    if found is ABSENT:
        return False
    try:
        return bool(low <= found) and bool(found <= high)
    except TypeError:
        return False


def isin(found: Any, values: list) -> bool:
    return found is not ABSENT and any(found == value for value in values)


def contains(found: Any, value: Any) -> bool:
    if not isinstance(found, (list, tuple, set, frozenset)):
        return False
    try:
        return value in found
    except TypeError:
        return False


FAMILIES = {type(None): 0, bool: 1, int: 1, float: 1, str: 2, tuple: 7}


def canon(value: Any) -> tuple | None:
    """The canonical order of a key value (None family, numbers, str, tuples), or None if not a key."""
    family = FAMILIES.get(type(value))
    if family is None:
        return None
    if family == 7:
        items = [canon(item) for item in value]
        return None if any(item is None for item in items) else (7, tuple(items))
    return (family, value)


# -- strategies -------------------------------------------------------------------------------------

SCALARS = [
    -2,
    -1,
    0,
    1,
    2,
    3,
    0.5,
    1.0,
    2.5,
    -1.5,
    "a",
    "b",
    "Paris",
    "",
    None,
    True,
    False,
    (1, 2),
    (1, "a"),
    ("a",),
    (),
    (2,),
]
scalars = st.sampled_from(SCALARS)
# Range bounds: no None (see test_range_with_none_bound), no tuples (see test_indexed_tuple_range_with_mixed_elements).
bounds = st.sampled_from([value for value in SCALARS if value is not None and type(value) is not tuple])
city = st.one_of(scalars, st.sampled_from([["a"], [1, 2], {"x": 1}]))
tags = st.one_of(
    st.lists(scalars, max_size=4),
    st.lists(scalars, max_size=3).map(tuple),
    st.sets(st.sampled_from(["a", "b", "vip", 1, 2, (1, 2)]), max_size=3),
    scalars,
)
address = st.one_of(st.fixed_dictionaries({}, optional={"city": city, "zip": scalars}), scalars)
record = st.fixed_dictionaries({}, optional={"city": city, "score": scalars, "tags": tags, "address": address})
keys = st.sampled_from([f"k{i}" for i in range(16)])
records = st.dictionaries(keys, record, max_size=12)


def filler(seed: int, count: int) -> dict:
    """`count` more records drawn from the same pools, to make collections tree-backed (> 64 keys)."""
    rng = random.Random(seed)
    made = {}
    for i in range(count):
        item: dict = {}
        if rng.random() < 0.8:
            item["city"] = rng.choice(SCALARS)
        if rng.random() < 0.8:
            item["score"] = rng.choice(SCALARS)
        if rng.random() < 0.6:
            item["tags"] = rng.sample(SCALARS, rng.randint(0, 3))
        if rng.random() < 0.5:
            item["address"] = {"city": rng.choice(SCALARS)}
        made[f"f{i}"] = item
    return made


Reference = Callable[[Any], bool]


def leaf(draw: Any) -> tuple[Any, Reference, str]:
    field = draw(st.sampled_from(FIELDS))
    f = F
    for part in field.split("."):
        f = getattr(f, part)
    kind = draw(st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "between", "isin", "contains"]))
    if kind in ("==", "!="):
        value = draw(st.one_of(scalars, st.sampled_from([["a"], [1, 2]])))
        expr = (f == value) if kind == "==" else (f != value)
        return expr, lambda r: compare(kind, get(r, field), value), f"{field} {kind} {value!r}"
    if kind in ("<", "<=", ">", ">="):
        value = draw(bounds)
        expr = _OPS[kind](f, value)
        return expr, lambda r: compare(kind, get(r, field), value), f"{field} {kind} {value!r}"
    if kind == "between":
        low, high = draw(bounds), draw(bounds)
        return f.between(low, high), lambda r: between(get(r, field), low, high), f"{field} in [{low!r}, {high!r}]"
    if kind == "isin":
        values = draw(st.lists(scalars, max_size=3))
        return f.isin(values), lambda r: isin(get(r, field), values), f"{field} isin {values!r}"
    value = draw(scalars)
    return f.contains(value), lambda r: contains(get(r, field), value), f"{field} contains {value!r}"


@st.composite
def expressions(draw: Any, depth: int = 0) -> tuple[Any, Reference, str]:
    shape = draw(st.sampled_from(["leaf"] * 3 + (["and", "or", "not"] if depth < 3 else [])))
    if shape == "leaf":
        return leaf(draw)
    if shape == "not":
        expr, ref, text = draw(expressions(depth + 1))
        return ~expr, lambda r: not ref(r), f"~({text})"
    parts = [draw(expressions(depth + 1)) for _ in range(draw(st.integers(2, 3)))]
    refs = [ref for _, ref, _ in parts]
    combined = parts[0][0]
    for expr, _, _ in parts[1:]:
        combined = (combined & expr) if shape == "and" else (combined | expr)
    if shape == "and":
        return combined, lambda r: all(ref(r) for ref in refs), " & ".join(f"({t})" for _, _, t in parts)
    return combined, lambda r: any(ref(r) for ref in refs), " | ".join(f"({t})" for _, _, t in parts)


field_edits = st.tuples(st.sampled_from(["city", "score", "tags", "address.city"]), st.one_of(scalars, tags))
edits = st.lists(
    st.one_of(
        st.tuples(st.just("set"), keys, record),
        st.tuples(st.just("delete"), keys),
        st.tuples(st.just("field"), keys, field_edits),
        st.tuples(st.just("drop_field"), keys, st.sampled_from(["city", "score", "tags", "address"])),
    ),
    max_size=8,
)


# -- running --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qdb(session_dir: str) -> Iterator[protobase.Database]:
    """One database for the module's examples; checked by db.check() as examples go."""
    import os
    import tempfile

    from tests.conftest import wait_for_coordinator_exit

    path = os.path.join(tempfile.mkdtemp(prefix="q", dir=session_dir), "db")
    database = open_test_db(path, durability="async")
    try:
        yield database
    finally:
        database.close()
        assert wait_for_coordinator_exit(path)


_names = itertools.count()


def fresh_collection(db: protobase.Database, data: dict, indexed: list[str], index_later: bool) -> str:
    """Store `data` under a new top-level key, with indexes on `indexed` (same or next commit)."""
    name = f"c{next(_names)}"
    with db.transaction() as tx:
        tx.root[name] = {key: value for key, value in data.items()}
        if not index_later:
            for field in indexed:
                tx.root[name].create_index(field)
    if index_later and indexed:
        with db.transaction() as tx:
            for field in indexed:
                tx.root[name].create_index(field)
    return name


def drop(db: protobase.Database, name: str) -> None:
    with db.transaction() as tx:
        del tx.root[name]


def check_queries(collection: Any, model: dict, exprs: list, where: str) -> None:
    for expr, ref, text in exprs:
        expected = {key for key, item in model.items() if ref(item)}
        query = collection.where(expr)
        got = query.keys()
        assert len(got) == len(set(got)), f"{where}: duplicate keys for {text}"
        assert set(got) == expected, f"{where}: {text}\nplan:\n{query.explain()}"
        assert query.count() == len(expected), f"{where}: count of {text}"
        assert {key: value for key, value in query.items()} == {key: model[key] for key in expected}
        assert len(list(query)) == len(expected)


def apply_edit(model: dict, target: Any, edit: tuple) -> None:
    """Apply one edit to both the model and a transaction's collection (skipped when it cannot apply)."""
    op, key = edit[0], edit[1]
    if op == "set":
        model[key] = freeze_model(edit[2])
        target[key] = freeze_model(edit[2])
    elif op == "delete":
        if key in model:
            del model[key]
            del target[key]
    elif op == "field":
        field, value = edit[2]
        if key not in model:
            return
        if field == "address.city":
            if not isinstance(model[key].get("address"), dict):
                return
            model[key]["address"]["city"] = value
            target[key]["address"]["city"] = value
        else:
            model[key][field] = value
            target[key][field] = value
    elif op == "drop_field":
        field = edit[2]
        if key in model and field in model[key]:
            del model[key][field]
            del target[key][field]


@SETTINGS
@given(
    data=records,
    extra=st.sampled_from([0, 0, 0, 70]),
    seed=st.integers(0, 1000),
    indexed=st.lists(st.sampled_from(FIELDS), unique=True, max_size=4),
    index_later=st.booleans(),
    exprs=st.lists(expressions(), min_size=1, max_size=4),
    changes=edits,
)
def test_where_matches_comprehension(
    qdb: protobase.Database,
    data: dict,
    extra: int,
    seed: int,
    indexed: list,
    index_later: bool,
    exprs: list,
    changes: list,
) -> None:
    model = {**filler(seed, extra), **data}
    name = fresh_collection(qdb, model, indexed, index_later)
    model = freeze_model(model)
    with qdb.snapshot() as snap:
        collection = snap.root[name]
        assert set(collection.indexes) == set(indexed)
        check_queries(collection, model, exprs, "snapshot")
    with qdb.transaction() as tx:
        for edit in changes:
            apply_edit(model, tx.root[name], edit)
        check_queries(tx.root[name], model, exprs, "transaction")
    with qdb.snapshot() as snap:
        check_queries(snap.root[name], model, exprs, "after commit")
    qdb.check()
    drop(qdb, name)


def freeze_model(model: dict) -> dict:
    """A deep plain copy of the model (edits must not alias the drawn examples)."""

    def copy(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: copy(item) for key, item in value.items()}
        if isinstance(value, list):
            return [copy(item) for item in value]
        if isinstance(value, set):
            return set(value)
        return value

    return copy(model)


# -- order, limit, first ----------------------------------------------------------------------------


def present_order(model: dict, keys: list, field: str) -> list:
    """canon() of the key values at `field` of `keys`, in their order, skipping missing and non-key values."""
    found = [canon(get(model[key], field)) for key in keys]
    return [value for value in found if value is not None]


def sort_class(model: dict, key: str, field: str) -> tuple | None:
    return canon(get(model[key], field))


@SETTINGS
@given(
    data=records,
    extra=st.sampled_from([0, 0, 70]),
    seed=st.integers(0, 1000),
    indexed=st.lists(st.sampled_from(FIELDS), unique=True, max_size=2),
    expr=expressions(),
    field=st.sampled_from(FIELDS),
    descending=st.booleans(),
    count=st.integers(0, 5),
)
def test_order_limit_first(
    qdb: protobase.Database,
    data: dict,
    extra: int,
    seed: int,
    indexed: list,
    expr: tuple,
    field: str,
    descending: bool,
    count: int,
) -> None:
    model = freeze_model({**filler(seed, extra), **data})
    name = fresh_collection(qdb, model, indexed, False)
    condition, ref, text = expr
    matching = [key for key, item in model.items() if ref(item)]
    ordered_values = sorted(present_order(model, matching, field), reverse=descending)
    unordered = sum(1 for key in matching if canon(get(model[key], field)) is None)
    with qdb.snapshot() as snap:
        query = snap.root[name].where(condition).order_by(field, descending=descending)
        got = query.keys()
        assert sorted(got) == sorted(matching), text
        assert present_order(model, got, field) == ordered_values, f"order by {field} of {text}"
        if not descending:  # records lacking the field, or holding a non-key value there, come last
            assert all(canon(get(model[key], field)) is None for key in got[len(got) - unordered :])
        limited = query.limit(count).keys()
        assert len(limited) == min(count, len(got)) and set(limited) <= set(matching)
        assert [sort_class(model, key, field) for key in limited] == [
            sort_class(model, key, field) for key in got[:count]
        ]
        first = query.first()
        if matching:
            assert canon(get(first, field)) == canon(get(model[got[0]], field))
            assert first in [model[key] for key in matching]
        else:
            assert first is None
    drop(qdb, name)


def test_order_by_descending_puts_missing_last(db: protobase.Database) -> None:
    """Descending order keeps records lacking the field (or holding a list there) last, as ascending does."""
    with db.transaction() as tx:
        tx.root["users"] = {"a": {"score": 1}, "b": {"score": 3}, "c": {}, "d": {"score": [1]}, "e": {"score": 2}}
    with db.snapshot() as snap:
        users = snap.root["users"]
        assert users.where().order_by("score").keys()[:3] == ["a", "e", "b"]
        assert set(users.where().order_by("score").keys()[3:]) == {"c", "d"}
        descending = users.where().order_by("score", descending=True).keys()
        assert descending[:3] == ["b", "e", "a"], descending
        assert set(descending[3:]) == {"c", "d"}


def test_order_by_mixed_types_is_canonical(db: protobase.Database) -> None:
    """Mixed-type values sort by family (None, numbers, str, tuples), then by value; nothing raises."""
    values = {"n": None, "i": 2, "f": 0.5, "b": True, "s": "x", "t": (1,), "l": [0]}
    with db.transaction() as tx:
        tx.root["things"] = {key: {"v": value} for key, value in values.items()}
        tx.root["things"].create_index("v")
    with db.snapshot() as snap:
        assert snap.root["things"].where().order_by("v").keys() == ["n", "f", "b", "i", "s", "t", "l"]
        assert snap.root["things"].where(F.v > 0).order_by("v").keys() == ["f", "b", "i"]


# -- aggregates and group_by ------------------------------------------------------------------------


def expected_or_error(compute: Callable[[], Any]) -> Any:
    try:
        return compute()
    except TypeError:
        return TypeError


def got_or_error(compute: Callable[[], Any]) -> Any:
    try:
        return compute()
    except TypeError:
        return TypeError


def values_of(items: list, field: str) -> list:
    return [value for value in (get(item, field) for item in items) if value is not ABSENT]


def extreme(values: list, pick: Callable) -> Any:
    keyed = [value for value in values if canon(value) is not None]
    return pick(keyed, key=canon) if keyed else None


def average(values: list) -> Any:
    return sum(values) / len(values) if values else None


def group_key(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return repr(freeze(value))  # an unhashable group is named by the repr of its snapshot value
    return value


@SETTINGS
@given(
    data=records,
    indexed=st.lists(st.sampled_from(FIELDS), unique=True, max_size=2),
    expr=expressions(),
    numeric=st.booleans(),
)
def test_aggregates_and_group_by(
    qdb: protobase.Database, data: dict, indexed: list, expr: tuple, numeric: bool
) -> None:
    if numeric:  # mostly summable scores, so sums and averages are exercised beyond TypeError
        data = {
            key: {**item, "score": [1, 2, 0.5, -1.5, True][len(key) % 5]} if "score" in item else item
            for key, item in data.items()
        }
    model = freeze_model(data)
    name = fresh_collection(qdb, model, indexed, False)
    condition, ref, text = expr
    matching = [item for item in model.values() if ref(item)]
    scores = values_of(matching, "score")
    with qdb.snapshot() as snap:
        query = snap.root[name].where(condition)
        assert got_or_error(lambda: query.sum("score")) == expected_or_error(lambda: sum(scores)), text
        assert got_or_error(lambda: query.avg("score")) == expected_or_error(lambda: average(scores)), text
        assert canon(query.min("score")) == canon(extreme(scores, min))
        assert canon(query.max("score")) == canon(extreme(scores, max))
        groups: dict = {}
        for item in matching:
            group = get(item, "city")
            if group is not ABSENT:
                groups.setdefault(group_key(group), []).append(item)
        grouped = query.group_by("city")
        assert grouped.count() == {group: len(items) for group, items in groups.items()}, text
        assert got_or_error(lambda: grouped.sum("score")) == expected_or_error(
            lambda: {group: sum(values_of(items, "score")) for group, items in groups.items()}
        )
        assert got_or_error(lambda: grouped.avg("score")) == expected_or_error(
            lambda: {group: average(values_of(items, "score")) for group, items in groups.items()}
        )
        got_min = grouped.min("score")
        assert {g: canon(v) for g, v in got_min.items()} == {
            g: canon(extreme(values_of(items, "score"), min)) for g, items in groups.items()
        }
        got_max = grouped.max("score")
        assert {g: canon(v) for g, v in got_max.items()} == {
            g: canon(extreme(values_of(items, "score"), max)) for g, items in groups.items()
        }
    drop(qdb, name)


# -- known deviations --------------------------------------------------------------------------------


@pytest.mark.parametrize("indexed", [False, True])
def test_range_with_none_bound(db: protobase.Database, indexed: bool) -> None:
    """`F.score > None` compares with None, which Python refuses (3 > None raises): nothing matches."""
    with db.transaction() as tx:
        tx.root["users"] = {"a": {"score": 3}, "b": {"score": "x"}, "c": {"score": None}, "d": {}}
        if indexed:
            tx.root["users"].create_index("score")
    with db.snapshot() as snap:
        users = snap.root["users"]
        assert users.where(F.score >= None).keys() == []
        assert users.where(F.score > None).keys() == []
        assert users.where(F.score < None).keys() == []


def test_contains_on_big_list_changed_in_transaction(db: protobase.Database) -> None:
    """Inside a transaction, `contains` sees a changed record's tree-backed list (> 256 items)."""
    with db.transaction() as tx:
        tx.root["users"] = {"a": {"tags": list(range(300)), "score": 1}}
        tx.root["users"].create_index("tags")
    with db.snapshot() as snap:
        assert snap.root["users"].where(F.tags.contains(5)).keys() == ["a"]
    tx = db.transaction()
    try:
        tx.root["users"]["a"]["score"] = 2  # the record is changed, so it is checked directly
        assert tx.root["users"].where(F.tags.contains(5)).keys() == ["a"]
    finally:
        tx.abort()


def test_a_filtered_index_query_skips_records_deleted_in_the_transaction(db: protobase.Database) -> None:
    """Regression: a filter over an index read the records of keys the transaction had deleted (KeyError)."""
    with db.transaction() as tx:
        tx.root["users"] = {f"k{i}": {"city": "a" if i % 2 else "b", "score": i} for i in range(200)}
        tx.root["users"].create_index("city")
    tx = db.transaction()
    try:
        users = tx.root["users"]
        del users["k1"]
        users["k2"] = {"city": "a", "score": 0}
        query = users.where((F.city == "a") & (F.score < 5))
        assert "FilterPlan" in query.explain() and "IndexedSearchPlan" in query.explain()
        assert sorted(query.keys()) == ["k2", "k3"]
    finally:
        tx.abort()


def test_indexed_tuple_range_with_mixed_elements(db: protobase.Database) -> None:
    """A tuple range over an indexed field whose tuples Python cannot compare with the bound matches nothing."""
    with db.transaction() as tx:
        tx.root["users"] = {"a": {"tags": ("a",)}, "b": {"tags": (1,)}}
        tx.root["users"].create_index("tags")
    with db.snapshot() as snap:
        users = snap.root["users"]
        assert users.where(F.tags < (2,)).keys() == ["b"]


def test_decimal_nan_values_are_left_out_of_an_index(db: protobase.Database) -> None:
    """A NaN cannot be ordered: indexed, it broke the index's order (and the coordinator, with InvalidOperation)."""
    with db.transaction() as tx:
        tx.root["prices"] = {f"p{i}": {"price": Decimal(i)} for i in range(100)}
        tx.root["prices"]["nan"] = {"price": Decimal("NaN")}
        tx.root["prices"]["snan"] = {"price": Decimal("sNaN")}
    with db.transaction() as tx:
        tx.root["prices"].create_index("price")
    db.check()
    with db.snapshot() as snap:
        query = snap.root["prices"].where((F.price >= 50) & (F.price < 53))
        assert "IndexedRangeSearchPlan" in query.explain() and sorted(query.keys()) == ["p50", "p51", "p52"]
        assert snap.root["prices"].where(F.price == Decimal(7)).keys() == ["p7"]


@pytest.mark.parametrize(
    "membership",
    [
        lambda: F.score in [1, 2],
        lambda: F.score not in (1, 2),
        lambda: F.score in {1, 2},
        lambda: F.address.city in ["Paris"],
    ],
    ids=["list", "not-in-tuple", "set", "nested-field"],
)
def test_membership_with_in_points_to_isin(membership: Callable[[], bool]) -> None:
    with pytest.raises(TypeError, match=r"to test membership use F\.(score|address\.city)\.isin\(values\)"):
        membership()


def test_and_or_between_conditions_still_points_to_the_operators() -> None:
    with pytest.raises(TypeError, match=re.escape("to combine conditions use & | ~, not and / or / not")):
        _ = (F.city == "Paris") and (F.score > 5)
    with pytest.raises(TypeError, match=re.escape("use & | ~ to combine query conditions, not and / or / not")):
        _ = (F.score > 5) or (F.city == "Paris")
