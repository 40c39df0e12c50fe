"""Secondary indexes: the planner's choices (explain) and index maintenance.

Plans: each representative query shows the expected plan tree, single-term
estimates equal the real counts, and every result equals a comprehension.
Maintenance: inserts, updates, deletes, nested fields, records lacking the
field, list-valued fields, big records (> 64 keys) and big lists (> 256
items), drop_index, create_index on existing and just-assigned collections,
restart, compaction and two concurrent writer processes; `db.check()` (which
verifies index contents) passes after every step.
"""

from __future__ import annotations

import multiprocessing
import random
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protobase
from protobase import F
from protobase.core import codec
from protobase.core import index as index_module
from protobase.core.btree import sorted_keys
from protobase.core.index import VALUE_ENTRY, collect_entries, index_entries, sorted_entries
from protobase.query import (
    AndMerge,
    FilterPlan,
    FullScanPlan,
    IndexedRangeSearchPlan,
    IndexedSearchPlan,
    OrMerge,
)
from tests.conftest import open_test_db, wait_for_coordinator_exit

SPAWN = multiprocessing.get_context("spawn")
DEADLINE = 60.0
CITIES = [f"c{i}" for i in range(10)]


def open_db(path: str) -> protobase.Database:
    return open_test_db(path, durability="async")


@pytest.fixture
def fast_db(datadir: str) -> Iterator[protobase.Database]:
    database = open_db(datadir)
    yield database
    database.close()


def get(record: Any, field: str) -> Any:
    value = record
    for part in field.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def expected(collection: Any, predicate: Any) -> set:
    return {key for key, record in collection.items() if predicate(record)}


# -- plans ---------------------------------------------------------------------------------------------


def user(i: int) -> dict:
    record = {"city": CITIES[i % 10], "score": i % 50, "email": f"u{i}@x", "tags": ["vip"] if i % 40 == 0 else []}
    if i % 7 == 0:
        del record["city"]
    return record


@pytest.fixture
def users_db(fast_db: protobase.Database) -> protobase.Database:
    with fast_db.transaction() as tx:
        tx.root["users"] = {f"u{i}": user(i) for i in range(200)}
        for field in ("city", "score", "tags"):
            tx.root["users"].create_index(field)
    fast_db.check()
    return fast_db


def plain(snap: protobase.Snapshot) -> dict:
    return {key: dict(record) for key, record in snap.root["users"].items()}


def check_result(users: Any, query: Any, predicate: Any) -> set:
    found = set(query.keys())
    assert found == expected(users, predicate)
    assert query.count() == len(found)
    return found


def test_single_term_plans_estimate_exactly(users_db: protobase.Database) -> None:
    cases = [
        (F.city == "c1", IndexedSearchPlan, "IndexedSearchPlan(city == 'c1')", lambda r: r.get("city") == "c1"),
        (
            F.city.isin(["c1", "c2", "c1"]),
            IndexedSearchPlan,
            "IndexedSearchPlan(city in ['c1', 'c2'])",
            lambda r: r.get("city") in ("c1", "c2"),
        ),
        (
            F.tags.contains("vip"),
            IndexedSearchPlan,
            "IndexedSearchPlan(tags contains 'vip')",
            lambda r: "vip" in r["tags"],
        ),
        (F.score <= 10, IndexedRangeSearchPlan, "IndexedRangeSearchPlan(score <= 10)", lambda r: r["score"] <= 10),
        (F.score >= 45, IndexedRangeSearchPlan, "IndexedRangeSearchPlan(45 <= score)", lambda r: r["score"] >= 45),
        (
            F.score.between(10, 12),
            IndexedRangeSearchPlan,
            "IndexedRangeSearchPlan(10 <= score <= 12)",
            lambda r: 10 <= r["score"] <= 12,
        ),
        (F.city == "nowhere", IndexedSearchPlan, "IndexedSearchPlan(city == 'nowhere')", lambda r: False),
    ]
    with users_db.snapshot() as snap:
        users = snap.root["users"]
        assert users.indexes == ("city", "score", "tags")
        for expr, kind, head, predicate in cases:
            query = users.where(expr)
            found = check_result(users, query, predicate)
            assert type(query.plan) is kind, query.explain()
            assert query.plan.estimate == len(found), query.explain()
            assert query.explain() == f"{head} ~{len(found)} records"


def test_combined_plans(users_db: protobase.Database) -> None:
    with users_db.snapshot() as snap:
        users = snap.root["users"]

        # two selective indexed terms: intersected, smallest first
        query = users.where((F.city == "c0") & F.tags.contains("vip"))
        check_result(users, query, lambda r: r.get("city") == "c0" and "vip" in r["tags"])
        assert type(query.plan) is AndMerge
        assert [type(part) for part in query.plan.parts] == [IndexedSearchPlan, IndexedSearchPlan]
        assert [part.estimate for part in query.plan.parts] == [5, 17]
        assert query.explain().splitlines() == [
            "AndMerge ~5 records",
            "  IndexedSearchPlan(tags contains 'vip') ~5 records",
            "  IndexedSearchPlan(city == 'c0') ~17 records",
        ]

        # a term without an index filters the indexed candidates
        query = users.where((F.city == "c1") & (F.email == "u1@x"))
        check_result(users, query, lambda r: r.get("city") == "c1" and r["email"] == "u1@x")
        assert type(query.plan) is FilterPlan and type(query.plan.base) is IndexedSearchPlan
        assert query.explain().splitlines() == [
            "FilterPlan(email == 'u1@x') ~17 records",
            "  IndexedSearchPlan(city == 'c1') ~17 records",
        ]

        # every term of an OR indexed: union of key sets
        query = users.where((F.city == "c1") | (F.score >= 48) | F.tags.contains("vip"))
        check_result(users, query, lambda r: r.get("city") == "c1" or r["score"] >= 48 or "vip" in r["tags"])
        assert type(query.plan) is OrMerge
        assert [type(part) for part in query.plan.parts] == [
            IndexedSearchPlan,
            IndexedRangeSearchPlan,
            IndexedSearchPlan,
        ]
        assert query.explain().splitlines()[0] == "OrMerge ~30 records"  # 17 + 8 + 5, an upper bound

        # one term of an OR without an index: a full scan with the whole condition as filter
        query = users.where((F.city == "c1") | (F.email == "u2@x"))
        check_result(users, query, lambda r: r.get("city") == "c1" or r["email"] == "u2@x")
        assert type(query.plan) is FilterPlan and type(query.plan.base) is FullScanPlan
        assert query.explain().splitlines() == [
            "FilterPlan((city == 'c1') | (email == 'u2@x')) ~200 records",
            "  FullScanPlan ~200 records",
        ]

        # negation: never from an index
        query = users.where(~(F.city == "c1"))
        check_result(users, query, lambda r: r.get("city") != "c1")
        assert type(query.plan) is FilterPlan and type(query.plan.base) is FullScanPlan

        # no condition at all
        assert type(users.where().plan) is FullScanPlan and users.where().count() == 200


def test_probe_instead_of_scanning_a_big_index_range(users_db: protobase.Database) -> None:
    """An indexed term 40x larger than the other is checked on the few candidates instead of scanned."""
    with users_db.snapshot() as snap:
        users = snap.root["users"]
        query = users.where(F.tags.contains("vip") & (F.score >= 0))
        check_result(users, query, lambda r: "vip" in r["tags"])
        assert type(query.plan) is FilterPlan
        assert type(query.plan.base) is IndexedSearchPlan and query.plan.base.estimate == 5
        assert query.explain().splitlines() == [
            "FilterPlan(0 <= score) ~5 records",
            "  IndexedSearchPlan(tags contains 'vip') ~5 records",
        ]
        # of comparable sizes, both are intersected
        query = users.where(F.tags.contains("vip") & (F.score < 8))
        check_result(users, query, lambda r: "vip" in r["tags"] and r["score"] < 8)
        assert type(query.plan) is AndMerge


def test_explain_in_transaction_notes_changed_keys(users_db: protobase.Database) -> None:
    tx = users_db.transaction()
    try:
        users = tx.root["users"]
        users["u1"]["city"] = "c2"
        del users["u2"]
        users["new"] = {"city": "c2", "score": 1, "tags": []}
        query = users.where(F.city == "c2")
        assert query.explain().splitlines() == [
            "IndexedSearchPlan(city == 'c2') ~17 records",
            "+ 3 keys changed in this transaction, checked directly",
        ]
        found = set(query.keys())
        assert found == {key for key in users if get(users[key], "city") == "c2"}
        assert "u1" in found and "new" in found and "u2" not in found
    finally:
        tx.abort()


@pytest.mark.parametrize("expr", [F.score < 10, F.score > 45], ids=["lt", "gt"])
def test_exclusive_range_estimate_is_exact(users_db: protobase.Database, expr: Any) -> None:
    with users_db.snapshot() as snap:
        query = snap.root["users"].where(expr)
        assert type(query.plan) is IndexedRangeSearchPlan
        assert query.plan.estimate == query.count(), query.explain()


# -- maintenance -------------------------------------------------------------------------------------


def assert_index_consistent(db: protobase.Database, name: str, field: str, probes: list) -> None:
    """db.check() passes, and each probe query on `field` returns what a scan does."""
    db.check()
    with db.snapshot() as snap:
        collection = snap.root[name]
        assert field in collection.indexes
        for value in probes:
            for expr, predicate in [
                (getattr_path(field) == value, lambda r, v=value: _eq(get(r, field), v)),
                (getattr_path(field).contains(value), lambda r, v=value: _has(get(r, field), v)),
            ]:
                query = collection.where(expr)
                assert query.plan.uses_index
                assert set(query.keys()) == expected(collection, predicate), (expr, query.explain())


def getattr_path(field: str) -> Any:
    result: Any = F
    for part in field.split("."):
        result = getattr(result, part)
    return result


def _eq(found: Any, value: Any) -> bool:
    return found is not None and found == value


def _has(found: Any, value: Any) -> bool:
    return hasattr(found, "__iter__") and not isinstance(found, (str, dict)) and value in list(found)


def test_maintenance_of_a_flat_field(fast_db: protobase.Database) -> None:
    db = fast_db
    probes = ["Paris", "Lyon", "Nice"]
    with db.transaction() as tx:
        tx.root["users"] = {"alice": {"city": "Paris"}, "bob": {"city": "Lyon"}}
        tx.root["users"].create_index("city")
    assert_index_consistent(db, "users", "city", probes)
    steps = [
        lambda users: users.__setitem__("carol", {"city": "Paris"}),  # insert
        lambda users: users["bob"].__setitem__("city", "Paris"),  # update the field
        lambda users: users.__setitem__("alice", {"city": "Nice", "age": 3}),  # replace the record
        lambda users: users.__setitem__("dave", {"name": "no city"}),  # a record lacking the field
        lambda users: users["carol"].__delitem__("city"),  # the field removed
        lambda users: users["dave"].__setitem__("city", "Lyon"),  # the field added
        lambda users: users["bob"].__setitem__("city", ["Paris", "Nice"]),  # a list: contains, not ==
        lambda users: users["bob"]["city"].append("Lyon"),  # an element added inside the record
        lambda users: users.__delitem__("alice"),  # delete
        lambda users: users["bob"].__setitem__("city", {"nested": "dict"}),  # not indexable: absent
    ]
    for step in steps:
        with db.transaction() as tx:
            step(tx.root["users"])
        assert_index_consistent(db, "users", "city", probes)
    with db.snapshot() as snap:
        users = snap.root["users"]
        assert set(users.where(F.city == "Lyon").keys()) == {"dave"}
        assert set(users.where(F.city == "Paris").keys()) == set()


def test_maintenance_of_a_nested_field(fast_db: protobase.Database) -> None:
    db = fast_db
    probes = ["Paris", "Lyon"]
    with db.transaction() as tx:
        tx.root["users"] = {"alice": {"address": {"city": "Paris"}}, "bob": {"address": "somewhere"}, "carol": {}}
        tx.root["users"].create_index("address.city")
    assert_index_consistent(db, "users", "address.city", probes)
    steps = [
        lambda users: users["alice"]["address"].__setitem__("city", "Lyon"),
        lambda users: users["bob"].__setitem__("address", {"city": "Paris", "zip": 1}),
        lambda users: users["carol"].__setitem__("address", {}),
        lambda users: users["carol"]["address"].__setitem__("city", "Paris"),
        lambda users: users["alice"].__delitem__("address"),
        lambda users: users["bob"]["address"].__delitem__("city"),
    ]
    for step in steps:
        with db.transaction() as tx:
            step(tx.root["users"])
        assert_index_consistent(db, "users", "address.city", probes)
    with db.snapshot() as snap:
        assert snap.root["users"].where(F.address.city == "Paris").keys() == ["carol"]
        assert "address.city" in snap.root["users"].where(F.address.city == "Paris").explain()


def test_big_records_and_big_lists(fast_db: protobase.Database) -> None:
    """Records with > 64 keys and list fields with > 256 items are tree-backed; their indexes follow."""
    db = fast_db
    big_record = {f"f{i}": i for i in range(80)}
    with db.transaction() as tx:
        tx.root["users"] = {
            "big": {**big_record, "city": "Paris", "tags": ["a"]},
            "long": {"city": "Lyon", "tags": [f"t{i}" for i in range(300)]},
            "small": {"city": "Paris", "tags": ["t5"]},
        }
        tx.root["users"].create_index("city")
        tx.root["users"].create_index("tags")
    probes = ["Paris", "Lyon", "a", "t5", "t299", "new"]
    for field in ("city", "tags"):
        assert_index_consistent(db, "users", field, probes)
    with db.snapshot() as snap:
        users = snap.root["users"]
        assert type(users["big"]).__name__ == "TreeDict" and type(users["long"]["tags"]).__name__ == "TreeList"
        assert set(users.where(F.tags.contains("t5")).keys()) == {"long", "small"}
        assert users.where(F.tags.contains("t5")).plan.estimate == 2
    steps = [
        lambda users: users["big"].__setitem__("city", "Lyon"),  # a field of a tree-backed record
        lambda users: users["big"].__setitem__("f3", "x"),  # another field: no index change
        lambda users: users["long"]["tags"].append("new"),  # an element op on a tree-backed list
        lambda users: users["long"]["tags"].__delitem__(5),  # "t5" removed from the big list
        lambda users: users["long"]["tags"].__setitem__(0, "a"),
        lambda users: users["big"].__delitem__("tags"),
        lambda users: users.__setitem__("long2", {"tags": [f"t{i}" for i in range(260)] + ["new"]}),
        lambda users: users.__delitem__("long"),
    ]
    for step in steps:
        with db.transaction() as tx:
            step(tx.root["users"])
        for field in ("city", "tags"):
            assert_index_consistent(db, "users", field, probes)
    with db.snapshot() as snap:
        users = snap.root["users"]
        assert set(users.where(F.tags.contains("new")).keys()) == {"long2"}
        assert set(users.where(F.city == "Lyon").keys()) == {"big"}


def test_single_record_writes_keep_big_indexes_as_a_model_says(fast_db: protobase.Database) -> None:
    # One record a commit into a collection of thousands with indexes several levels deep: the
    # coordinator splices the record and its changed entries into the trees' bytes (a score
    # moves, tags come and go: several entries of one index at once, leaves that split).
    db = fast_db
    rng = random.Random(4)

    def record(i: int) -> dict:
        return {"score": rng.randrange(40), "tags": rng.sample(["a", "b", "c", "d", "e"], rng.randrange(4)), "n": i}

    model = {f"u{i:05d}": record(i) for i in range(5000)}
    with db.transaction() as tx:
        tx.root["users"] = dict(model)
        tx.root["users"].create_index("score")
        tx.root["users"].create_index("tags")
    for i in range(300):
        key = rng.choice(list(model)) if i % 4 else f"new{i:04d}"
        model[key] = record(-i)
        with db.transaction() as tx:
            tx.root["users"][key] = model[key]
    db.check()
    with db.snapshot() as snap:
        users = snap.root["users"]
        for score in (0, 7, 39):
            assert set(users.where(F.score == score).keys()) == {k for k, r in model.items() if r["score"] == score}
        for tag in "ae":
            assert set(users.where(F.tags.contains(tag)).keys()) == {k for k, r in model.items() if tag in r["tags"]}
        assert {key: dict(record) for key, record in users.items()} == model


def test_drop_index(fast_db: protobase.Database) -> None:
    db = fast_db
    with db.transaction() as tx:
        tx.root["users"] = {f"u{i}": user(i) for i in range(100)}
        tx.root["users"].create_index("city")
        tx.root["users"].create_index("score")
    db.check()
    with db.transaction() as tx:
        tx.root["users"].drop_index("city")
        tx.root["users"].drop_index("not indexed")  # dropping an absent index does nothing
    db.check()
    with db.snapshot() as snap:
        users = snap.root["users"]
        assert users.indexes == ("score",)
        query = users.where(F.city == "c1")
        assert type(query.plan) is FilterPlan and type(query.plan.base) is FullScanPlan
        assert set(query.keys()) == expected(users, lambda r: r.get("city") == "c1")
        assert type(users.where(F.score == 3).plan) is IndexedSearchPlan
    with db.transaction() as tx:
        tx.root["users"].drop_index("score")
        tx.root["users"]["u1"]["score"] = 99  # writes after the last index is gone
    db.check()
    with db.snapshot() as snap:
        users = snap.root["users"]
        assert users.indexes == ()
        assert users.where(F.score == 99).keys() == ["u1"]
        assert len(users) == 100
    with db.transaction() as tx:  # and indexed again
        tx.root["users"].create_index("score")
    db.check()
    with db.snapshot() as snap:
        assert snap.root["users"].where(F.score == 99).keys() == ["u1"]
        assert snap.root["users"].where(F.score == 99).plan.estimate == 1


def test_dropping_an_index_of_a_collection_without_indexes_keeps_its_records(fast_db: protobase.Database) -> None:
    """Regression: the collection (a tree, 300 records) was stored as the number of its pointer."""
    with fast_db.transaction() as tx:
        tx.root["users"] = {f"u{i}": user(i) for i in range(300)}
    with fast_db.transaction() as tx:
        tx.root["users"].drop_index("city")
    fast_db.check()
    with fast_db.snapshot() as snap:
        assert len(snap.root["users"]) == 300 and snap.root["users"]["u7"] == user(7)


@pytest.mark.parametrize("count", [3, 100])
def test_create_index_on_existing_collection(fast_db: protobase.Database, count: int) -> None:
    """Small (one-atom) and tree-backed collections get their index built from the existing records."""
    db = fast_db
    with db.transaction() as tx:
        tx.root["users"] = {f"u{i}": user(i) for i in range(count)}
    with db.transaction() as tx:
        tx.root["users"].create_index("city")
        tx.root["users"]["u0"]["city"] = "c9"  # a write in the same commit as the build
    db.check()
    with db.snapshot() as snap:
        users = snap.root["users"]
        assert users.indexes == ("city",)
        for city in CITIES:
            query = users.where(F.city == city)
            assert type(query.plan) is IndexedSearchPlan
            assert set(query.keys()) == expected(users, lambda r, c=city: r.get("city") == c)
            assert query.plan.estimate == query.count()


def test_create_index_on_dict_assigned_in_same_transaction(fast_db: protobase.Database) -> None:
    db = fast_db
    with db.transaction() as tx:
        tx.root["users"] = {}
        tx.root["users"]["alice"] = {"city": "Paris", "address": {"city": "Paris"}}
        tx.root["users"]["bob"] = {"city": "Lyon"}
        tx.root["users"].create_index("city")
        tx.root["users"].create_index("address.city")
        tx.root["users"]["carol"] = {"city": "Paris"}  # after create_index, still in the same transaction
        assert set(tx.root["users"].where(F.city == "Paris").keys()) == {"alice", "carol"}
    db.check()
    with db.snapshot() as snap:
        users = snap.root["users"]
        assert users.indexes == ("address.city", "city")
        query = users.where(F.city == "Paris")
        assert type(query.plan) is IndexedSearchPlan and set(query.keys()) == {"alice", "carol"}
        assert users.where(F.address.city == "Paris").keys() == ["alice"]


def test_indexes_survive_restart_and_compaction(datadir: str) -> None:
    db = open_db(datadir)
    try:
        with db.transaction() as tx:
            tx.root["users"] = {f"u{i}": user(i) for i in range(150)}
            tx.root["users"].create_index("city")
            tx.root["users"].create_index("tags")
        for i in range(10):  # some garbage for compaction to drop
            with db.transaction() as tx:
                tx.root["users"][f"u{i}"]["city"] = "moved"
    finally:
        db.close()
    assert wait_for_coordinator_exit(datadir)

    def verify(database: protobase.Database) -> None:
        database.check()
        with database.snapshot() as snap:
            users = snap.root["users"]
            assert users.indexes == ("city", "tags")
            for expr, predicate in [
                (F.city == "moved", lambda r: r.get("city") == "moved"),
                (F.city == "c3", lambda r: r.get("city") == "c3"),
                (F.tags.contains("vip"), lambda r: "vip" in r["tags"]),
            ]:
                query = users.where(expr)
                assert type(query.plan) is IndexedSearchPlan
                assert set(query.keys()) == expected(users, predicate)
                assert query.plan.estimate == query.count()
            assert users.where(F.city == "moved").count() == 10

    db = open_db(datadir)
    try:
        verify(db)
        db.compact()
        verify(db)
        with db.transaction() as tx:  # maintenance still works after compaction
            tx.root["users"]["u20"]["city"] = "moved"
        db.check()
        with db.snapshot() as snap:
            assert snap.root["users"].where(F.city == "moved").count() == 11
    finally:
        db.close()


# -- concurrent writers ------------------------------------------------------------------------------


def _writer(path: str, seed: int, rounds: int) -> int:
    """Random inserts, updates and deletes on the indexed collection, retried on conflict."""
    rng = random.Random(seed)
    db = open_db(path)
    try:
        for _ in range(rounds):
            for attempt in db.attempts(retries=1000):
                with attempt as tx:
                    users = tx.root["users"]
                    for _ in range(3):
                        key = f"u{rng.randrange(40)}"
                        choice = rng.random()
                        if choice < 0.2 and key in users:
                            del users[key]
                        elif choice < 0.6 and key in users:
                            users[key]["city"] = rng.choice(CITIES)
                            users[key]["tags"] = rng.sample(["a", "b", "vip"], rng.randint(0, 2))
                        else:
                            users[key] = {"city": rng.choice(CITIES), "tags": ["a"], "writer": seed}
        return rounds
    finally:
        db.close()


def test_concurrent_writers_keep_indexes_consistent(fast_db: protobase.Database, datadir: str) -> None:
    db = fast_db
    with db.transaction() as tx:
        tx.root["users"] = {f"u{i}": user(i) for i in range(40)}
        tx.root["users"].create_index("city")
        tx.root["users"].create_index("tags")
    processes = [SPAWN.Process(target=_writer, args=(datadir, seed, 40), daemon=True) for seed in (1, 2)]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join(DEADLINE * 3)
            assert process.exitcode == 0
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(DEADLINE)
    db.check()
    with db.snapshot() as snap:
        users = snap.root["users"]
        for city in CITIES:
            assert set(users.where(F.city == city).keys()) == expected(users, lambda r, c=city: r.get("city") == c)
        for tag in ("a", "b", "vip"):
            query = users.where(F.tags.contains(tag))
            assert set(query.keys()) == expected(users, lambda r, t=tag: t in r["tags"])
            assert query.plan.estimate == query.count()


# -- composite indexes ----------------------------------------------------------------------


def _matching(records: dict, predicate) -> set:
    found = set()
    for key, record in records.items():
        try:
            if predicate(record):
                found.add(key)
        except TypeError:
            pass
    return found


def test_composite_index_answers_equality_plus_range_exactly(datadir):
    rng = random.Random(11)
    cities = ["c0", "c1", "c2", 5, None]
    records = {
        f"u{i}": {"city": rng.choice(cities), "score": rng.choice([rng.randrange(50), 2.5, "x", None])}
        for i in range(600)
    }
    for i in range(0, 600, 37):
        del records[f"u{i}"]["score"]
    with open_test_db(datadir, durability="async") as db:
        with db.transaction() as tx:
            tx.root["users"] = dict(records)
            tx.root["users"].create_index("city", "score")
        for _ in range(3):
            with db.snapshot() as snap:
                users = snap.root["users"]
                assert ("city", "score") in users.indexes
                for city in cities:
                    query = users.where((F.city == city) & (F.score > 20))
                    assert "on index (city, score)" in query.explain()
                    assert query.plan.estimate == query.count()  # the slice is exactly the result
                    assert set(query.keys()) == _matching(
                        records, lambda r, c=city: "score" in r and r["city"] == c and r["score"] > 20
                    )
                    between = users.where((F.city == city) & F.score.between(5, 9))
                    assert set(between.keys()) == _matching(
                        records, lambda r, c=city: "score" in r and r["city"] == c and 5 <= r["score"] <= 9
                    )
                    alone = users.where(F.city == city)  # records lacking score match: no composite here
                    assert "on index" not in alone.explain()
                    assert set(alone.keys()) == _matching(records, lambda r, c=city: r["city"] == c)
            with db.transaction() as tx:
                users = tx.root["users"]
                for _ in range(40):
                    key = f"u{rng.randrange(700)}"
                    if rng.random() < 0.25 and key in users:
                        del users[key]
                        records.pop(key, None)
                    elif key in users and rng.random() < 0.5:
                        users[key]["score"] = rng.randrange(50)
                        records[key] = {**records[key], "score": users[key]["score"]}
                    else:
                        record = {"city": rng.choice(cities), "score": rng.randrange(50)}
                        users[key] = record
                        records[key] = record
            db.check()
        with db.transaction() as tx:
            tx.root["users"].drop_index("city", "score")
        with db.snapshot() as snap:
            assert snap.root["users"].indexes == ()


field_values = st.one_of(
    st.text(max_size=3),
    st.integers(min_value=-5, max_value=5),
    st.booleans(),
    st.floats(allow_nan=False, min_value=-5, max_value=5),
    st.none(),
    st.lists(st.integers(max_value=3), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.one_of(st.text(max_size=3), st.integers()), st.fixed_dictionaries({}, optional={"f": field_values})
    )
)
def test_an_index_builds_its_entries_in_the_order_sorted_keys_gives(records: dict[Any, dict[str, Any]]) -> None:
    # sorted_entries sorts by value only when that is the canonical order (one family of values,
    # records listed in key order); any other mix takes sorted_keys, which it must equal.
    in_key_order = [(key, records[key]) for key in sorted_keys(records)]
    found = collect_entries(in_key_order, "f", lambda value: value)
    assert sorted_entries(found) == sorted_keys(found)


@pytest.mark.skipif(not codec.COMPILED, reason="the compiled core is not loaded")
@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 50),
            st.fixed_dictionaries({}, optional={"f": field_values, "g": field_values}),
            st.sampled_from(["dict", "packed", "other"]),
        ),
        max_size=30,
    )
)
def test_compiled_simple_entries_are_the_oracles(rows: list[tuple[int, dict[str, Any], str]]) -> None:
    # An index build reads a plain dict's or a Packed record's field in C and leaves every other
    # record to the general path, in order: the same entries, in the same order, as the oracle.
    def stored(record: dict[str, Any], kind: str) -> Any:
        return codec.Packed(codec.pack(record)) if kind == "packed" else [record] if kind == "other" else record

    pairs = [(key, stored(record, kind)) for key, record, kind in rows]

    def general(key: Any, record: Any) -> list[tuple[int, Any, Any]]:
        readable = codec.unpacked(record[0] if type(record) is list else record)
        return [(kind, value, key) for kind, value in index_entries(readable, "f")]

    compiled = index_module.collect_simple_entries(iter(pairs), "f", VALUE_ENTRY, general)
    assert compiled == index_module.collect_simple_entries_python(pairs, "f", VALUE_ENTRY, general)
    assert compiled == [entry for key, record in pairs for entry in general(key, record)]


def test_an_error_of_the_general_path_reaches_the_index_build() -> None:
    def general(key: Any, record: Any) -> list[tuple[int, Any, Any]]:
        raise ValueError(f"cannot read {key}")

    with pytest.raises(ValueError, match="cannot read 2"):
        index_module.collect_simple_entries([(1, {"f": "x"}), (2, {"f": [1]})], "f", VALUE_ENTRY, general)
