"""Transactions (transaction.py, database.py): recording, semantics, isolation, conflicts, retries, handles."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from decimal import Decimal

import pytest

import protobase
from protobase import (
    ConflictError,
    CoordinatorRestartedError,
    DatabaseClosedError,
    EncodingError,
    FrozenDict,
    FrozenList,
    FrozenSet,
    TreeDict,
    TreeList,
    TreeSet,
)
from protobase.core.codec import MAX_DEPTH
from protobase.core.frozen import thaw
from tests.conftest import open_test_db


def read(db, *path):
    """A plain deep copy of the value at `path` in a fresh snapshot."""
    with db.snapshot() as snap:
        value = snap.root
        for key in path:
            value = value[key]
        return thaw(value)


# -- recording ---------------------------------------------------------------------------


def test_nested_mutation_is_recorded(db):
    with db.transaction() as tx:
        tx.root["carts"] = {"u1": {"items": []}}
    with db.transaction() as tx:
        tx.root["carts"]["u1"]["items"].append("apple")
    with db.snapshot() as snap:
        assert snap.root["carts"]["u1"]["items"] == ["apple"]
        assert type(snap.root["carts"]["u1"]["items"]) is FrozenList
    with db.transaction() as tx:
        tx.root["carts"]["u1"]["items"].append("pear")
        tx.root["carts"]["u2"] = {"items": ["fig"]}
    assert read(db, "carts") == {"u1": {"items": ["apple", "pear"]}, "u2": {"items": ["fig"]}}


def test_mutation_inside_a_list_and_a_tuple_path(db):
    with db.transaction() as tx:
        tx.root["l"] = [{"k": 0}, [1], {1, 2}]
    with db.transaction() as tx:
        tx.root["l"][0]["k"] = 1
        tx.root["l"][1] += [2]
        tx.root["l"][2].add(3)
    assert read(db, "l") == [{"k": 1}, [1, 2], {1, 2, 3}]


def test_dict_semantics(db):
    with db.transaction() as tx:
        tx.root["d"] = {"a": 1, "b": 2, "c": 3}
    with db.transaction() as tx:
        d = tx.root["d"]
        assert d.setdefault("a", 100) == 1
        assert d.setdefault("z", 26) == 26
        assert d.pop("b") == 2
        assert d.pop("missing", "dflt") == "dflt"
        with pytest.raises(KeyError):
            d.pop("missing")
        d.update({"x": 10}, y=11)
        del d["c"]
        with pytest.raises(KeyError):
            del d["c"]
        assert len(d) == 4
        assert sorted(d) == ["a", "x", "y", "z"]
        assert "a" in d and "b" not in d and "c" not in d
        assert d.get("b") is None and d.get("x") == 10
        assert dict(d.items()) == {"a": 1, "x": 10, "y": 11, "z": 26}
        assert d == {"a": 1, "x": 10, "y": 11, "z": 26}
    assert read(db, "d") == {"a": 1, "x": 10, "y": 11, "z": 26}
    with db.transaction() as tx:
        tx.root["d"].clear()
    assert read(db, "d") == {}


def test_root_semantics(db):
    with db.transaction() as tx:
        tx.root.update(a=1, b=2)
        assert len(tx.root) == 2 and set(tx.root) == {"a", "b"}
    with db.transaction() as tx:
        del tx.root["a"]
        assert "a" not in tx.root
        assert tx.root.pop("b") == 2
        assert len(tx.root) == 0
    with db.snapshot() as snap:
        assert len(snap.root) == 0


def test_small_list_semantics(db):
    with db.transaction() as tx:
        tx.root["l"] = [3, 1, 2]
    with db.transaction() as tx:
        items = tx.root["l"]
        items.insert(0, 9)
        assert items.pop() == 2
        assert items.pop(0) == 9
        items.extend([7, 5])
        items.sort()
        assert items == [1, 3, 5, 7]
        assert len(items) == 4 and 5 in items and items[-1] == 7 and items[1:3] == [3, 5]
    assert read(db, "l") == [1, 3, 5, 7]
    with db.transaction() as tx:
        tx.root["l"].remove(3)
        tx.root["l"].reverse()
        tx.root["l"][0] = "first"
        del tx.root["l"][1]
    assert read(db, "l") == ["first", 1]


def test_small_set_semantics(db):
    with db.transaction() as tx:
        tx.root["s"] = {1, 2}
    with db.transaction() as tx:
        s = tx.root["s"]
        s.add(3)
        s.discard(1)
        s.discard(42)
        assert s == {2, 3} and len(s) == 2 and 3 in s and 1 not in s
    assert read(db, "s") == {2, 3}
    with db.transaction() as tx:
        tx.root["s"] |= {10}
        tx.root["s"].remove(2)
    assert read(db, "s") == {3, 10}
    with db.snapshot() as snap:
        assert type(snap.root["s"]) is FrozenSet


def test_assigning_transaction_values_stores_their_contents(db):
    with db.transaction() as tx:
        tx.root["d"] = {"n": {"m": [1]}}
        tx.root["s"] = {1, 2}
        tx.root["big"] = {i: i for i in range(100)}
    with db.transaction() as tx:
        tx.root["d2"] = tx.root["d"]
        tx.root["s2"] = tx.root["s"]
        tx.root["m2"] = tx.root["d"]["n"]["m"]
        tx.root["big2"] = tx.root["big"]
    assert read(db, "d2") == {"n": {"m": [1]}}
    assert read(db, "s2") == {1, 2}
    assert read(db, "m2") == [1]
    assert read(db, "big2") == {i: i for i in range(100)}
    with db.snapshot() as snap:
        assert type(snap.root["d2"]) is FrozenDict  # not a wrapper of the finished transaction
        assert type(snap.root["s2"]) is FrozenSet


def test_values_are_encoded_at_commit(db):
    with db.transaction() as tx:
        value = {"a": [1]}
        tx.root["v"] = value
        value["a"].append(2)  # like a plain dict: the state at commit is stored
    assert read(db, "v") == {"a": [1, 2]}


def test_supported_scalar_types_round_trip_through_the_database(db):
    import datetime as dt
    import uuid
    from decimal import Decimal

    value = {
        "n": None,
        "b": True,
        "i": 2**100,
        "f": 1.5,
        "s": "x",
        "y": b"\x00",
        "t": (1, "a"),
        "dt": dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
        "d": dt.date(2021, 2, 3),
        "dec": Decimal("1.10"),
        "u": uuid.UUID(int=7),
        "long": "z" * 5000,
        7: "int key",
        (1, 2): "tuple key",
    }
    with db.transaction() as tx:
        tx.root["v"] = value
    assert read(db, "v") == value


# -- big collections ---------------------------------------------------------------------


def test_big_dict_becomes_a_tree_and_takes_point_updates(db):
    with db.transaction() as tx:
        tx.root["big"] = {i: {"v": i} for i in range(500)}
    with db.snapshot() as snap:
        assert type(snap.root["big"]) is TreeDict
    with db.transaction() as tx:
        big = tx.root["big"]
        big[5]["v"] = "five"
        big[1000] = {"v": "new"}
        del big[6]
        big.pop(7)
        assert big[5] == {"v": "five"} and big[1000] == {"v": "new"}
        assert 6 not in big and 7 not in big and len(big) == 499
    expected = {i: {"v": i} for i in range(500)}
    expected[5] = {"v": "five"}
    expected[1000] = {"v": "new"}
    del expected[6], expected[7]
    assert read(db, "big") == expected
    db.check()


def test_small_dict_grows_into_a_tree_and_shrinks(db):
    with db.transaction() as tx:
        tx.root["g"] = {}
    with db.transaction() as tx:
        for i in range(100):
            tx.root["g"][i] = i
    with db.snapshot() as snap:
        assert type(snap.root["g"]) is TreeDict and len(snap.root["g"]) == 100
    with db.transaction() as tx:
        for i in range(90):
            del tx.root["g"][i]
    assert read(db, "g") == {i: i for i in range(90, 100)}
    db.check()


def test_big_list_operations(db):
    model = list(range(1000))
    with db.transaction() as tx:
        tx.root["bl"] = list(model)
    with db.snapshot() as snap:
        assert type(snap.root["bl"]) is TreeList
    with db.transaction() as tx:
        bl = tx.root["bl"]
        bl.append("end")
        bl.extend(["e1", "e2"])
        assert len(bl) == 1003 and bl[-1] == "e2" and bl[1000] == "end"
    model += ["end", "e1", "e2"]
    assert read(db, "bl") == model
    with db.transaction() as tx:
        bl = tx.root["bl"]
        bl.insert(0, "head")
        bl.insert(500, "middle")
        bl.insert(-1, "before-last")
        bl[10] = "ten"
        del bl[1]
        assert bl.pop() == "e2"
        assert bl.pop(3) == 3
        assert bl[0] == "head" and bl[8] == "ten"
        assert len(bl) == len(model)  # three inserts, three removals
    model.insert(0, "head")
    model.insert(500, "middle")
    model.insert(-1, "before-last")
    model[10] = "ten"
    del model[1]
    model.pop()
    model.pop(3)
    assert read(db, "bl") == model
    db.check()


def test_big_list_of_containers_nested_updates(db):
    with db.transaction() as tx:
        tx.root["rows"] = [{"n": i} for i in range(300)]
    with db.transaction() as tx:
        tx.root["rows"][7]["n"] = "seven"
        tx.root["rows"].append({"n": "last"})
    rows = read(db, "rows")
    assert rows[7] == {"n": "seven"} and rows[-1] == {"n": "last"} and len(rows) == 301


def test_big_set_operations(db):
    with db.transaction() as tx:
        tx.root["bs"] = set(range(200))
    with db.snapshot() as snap:
        assert type(snap.root["bs"]) is TreeSet
    with db.transaction() as tx:
        bs = tx.root["bs"]
        bs.add("new")
        bs.add(5)  # already there
        bs.discard(3)
        bs.discard("absent")
        bs.add(3)
        bs.discard(4)
        bs.remove(6)
        with pytest.raises(KeyError):
            bs.remove(6)
        assert "new" in bs and 4 not in bs and 3 in bs and len(bs) == 199
        assert set(bs) == (set(range(200)) - {4, 6}) | {"new"}
    assert read(db, "bs") == (set(range(200)) - {4, 6}) | {"new"}
    db.check()


def test_small_set_grows_into_a_tree(db):
    with db.transaction() as tx:
        tx.root["gs"] = set()
    with db.transaction() as tx:
        for i in range(100):
            tx.root["gs"].add(i)
    with db.snapshot() as snap:
        assert type(snap.root["gs"]) is TreeSet and len(snap.root["gs"]) == 100
    db.check()


def test_big_list_sort(db):
    with db.transaction() as tx:
        tx.root["bl"] = list(range(300, 0, -1))
    with db.transaction() as tx:
        tx.root["bl"].sort()
    assert read(db, "bl") == list(range(1, 301))


# -- reading your own writes --------------------------------------------------------------


def test_read_your_own_writes(db):
    with db.transaction() as tx:
        tx.root["a"] = {"x": 1}
        tx.root["bl"] = list(range(300))
        tx.root["bs"] = set(range(100))
    with db.transaction() as tx:
        tx.root["a"]["y"] = 2
        assert tx.root["a"] == {"x": 1, "y": 2}
        tx.root["new"] = [1]
        tx.root["new"].append(2)
        assert tx.root["new"] == [1, 2]
        del tx.root["a"]["x"]
        assert "x" not in tx.root["a"] and list(tx.root["a"]) == ["y"]
        tx.root["bl"].append(300)
        assert tx.root["bl"][300] == 300 and len(tx.root["bl"]) == 301
        tx.root["bl"][0] = "zero"
        assert tx.root["bl"][0] == "zero"
        tx.root["bs"].add("x")
        tx.root["bs"].discard(0)
        assert "x" in tx.root["bs"] and 0 not in tx.root["bs"] and len(tx.root["bs"]) == 100
        with db.snapshot() as snap:  # nothing is visible outside before the commit
            assert "new" not in snap.root and snap.root["a"] == {"x": 1}


# -- abort -----------------------------------------------------------------------------


def test_abort_on_exception_leaves_nothing(db):
    with db.transaction() as tx:
        tx.root["a"] = {"x": 1}
    seq = db.stats().seq
    with pytest.raises(RuntimeError, match="boom"):
        with db.transaction() as tx:
            tx.root["a"]["x"] = 2
            tx.root["b"] = [1]
            raise RuntimeError("boom")
    assert not tx.active
    assert db.stats().seq == seq
    with db.snapshot() as snap:
        assert dict(snap.root) == {"a": {"x": 1}}


def test_explicit_abort_and_empty_commit(db):
    tx = db.transaction()
    tx.root["a"] = 1
    tx.abort()
    tx.abort()  # idempotent
    seq = db.stats().seq
    with db.transaction() as tx:
        assert tx.root.get("a") is None
    assert tx.seq == seq  # a read-only transaction commits nothing
    assert db.stats().seq == seq


# -- conflicts ------------------------------------------------------------------------


def test_write_write_conflict_on_the_same_key(db):
    with db.transaction() as tx:
        tx.root["rec"] = {"x": 0, "y": 0}
    first, second = db.transaction(), db.transaction()
    first.root["rec"]["x"] = 1
    second.root["rec"]["x"] = 2
    seq = first.commit()
    with pytest.raises(ConflictError) as info:
        second.commit()
    error = info.value
    assert error.path == ("rec", "x")
    assert error.base_seq == second.base_seq and error.conflicting_seq == seq
    assert error.retryable
    assert f"key root['rec']['x'] was changed by commit {seq}" in str(error)
    assert not second.active
    assert read(db, "rec") == {"x": 1, "y": 0}


def test_no_conflict_on_different_keys_of_one_record(db):
    with db.transaction() as tx:
        tx.root["rec"] = {"x": 0, "y": 0}
    first, second = db.transaction(), db.transaction()
    first.root["rec"]["x"] = 1
    second.root["rec"]["y"] = 2
    first.commit()
    second.commit()
    assert read(db, "rec") == {"x": 1, "y": 2}


def test_replacing_a_record_conflicts_with_writing_inside_it(db):
    with db.transaction() as tx:
        tx.root["rec"] = {"x": 0}
    first, second = db.transaction(), db.transaction()
    first.root["rec"] = {"x": 5}
    second.root["rec"]["x"] = 6
    first.commit()
    with pytest.raises(ConflictError):
        second.commit()


def test_conflict_on_big_list_and_set_elements(db):
    with db.transaction() as tx:
        tx.root["bl"] = list(range(300))
        tx.root["bs"] = set(range(100))
    first, second = db.transaction(), db.transaction()
    first.root["bl"].append(1)
    second.root["bl"].append(2)
    first.commit()
    with pytest.raises(ConflictError):
        second.commit()
    assert read(db, "bl")[-1] == 1


def _write_skew(db, isolation):
    with db.transaction() as tx:
        tx.root["a"] = 1
        tx.root["b"] = 1
    t1, t2 = db.transaction(isolation), db.transaction(isolation)
    # the invariant a + b >= 1: each checks it, then zeroes a different key
    for tx, key in ((t1, "a"), (t2, "b")):
        if tx.root["a"] + tx.root["b"] >= 2:
            tx.root[key] = 0
    t1.commit()
    return t2


def test_snapshot_isolation_allows_write_skew(db):
    t2 = _write_skew(db, "snapshot")
    t2.commit()
    assert read(db, "a") == 0 and read(db, "b") == 0


def test_serializable_rejects_write_skew(db):
    t2 = _write_skew(db, "serializable")
    with pytest.raises(ConflictError) as info:
        t2.commit()
    assert info.value.path == ("a",)
    assert read(db, "a") + read(db, "b") == 1


def test_serializable_without_overlap_commits(db):
    with db.transaction() as tx:
        tx.root.update(a=1, b=1, c=1)
    t1, t2 = db.transaction("serializable"), db.transaction("serializable")
    t1.root["a"] = t1.root["c"] + 1
    t2.root["b"] = t2.root["c"] + 1
    t1.commit()
    t2.commit()
    assert (read(db, "a"), read(db, "b")) == (2, 2)


def test_unknown_isolation_level(db):
    with pytest.raises(ValueError, match="isolation must be one of"):
        db.transaction("read-committed")


# -- retries --------------------------------------------------------------------------


def test_attempts_retry_until_commit(db):
    with db.transaction() as tx:
        tx.root["c"] = 0
    bodies = 0
    for attempt in db.attempts(retries=5):
        with attempt as tx:
            bodies += 1
            tx.root["c"] = tx.root["c"] + 1
            if bodies < 3:  # another writer commits in between: this attempt conflicts
                with db.transaction() as other:
                    other.root["c"] = 100 * bodies
    assert bodies == 3 and attempt.committed
    assert read(db, "c") == 201


def test_attempts_back_off_a_bounded_random_while(db, monkeypatch):
    """Regression: the n-th retry slept up to 1 ms * 2**n, 1 s from the tenth on (p99 of 2.4 s in a cart app)."""
    import protobase.database

    slept = []
    monkeypatch.setattr(protobase.database.time, "sleep", slept.append)
    bodies = 0
    for attempt in db.attempts(retries=20):
        with attempt as tx:
            bodies += 1
            tx.root["c"] = bodies
            if bodies <= 20:
                raise CoordinatorRestartedError("the coordinator restarted")
    assert bodies == 21 and attempt.committed
    assert len(slept) == 20 and max(slept) <= protobase.database.MAX_BACKOFF == 0.005
    assert slept[0] <= 0.001 and len(set(slept)) == 20  # jittered from the first retry on


def test_attempts_jitter_after_a_first_conflict_and_retry_at_once_when_the_turn_comes(db, monkeypatch):
    """From the second conflict in a row on, the coordinator answers when it is the client's turn: no sleep."""
    import protobase.database

    slept = []
    monkeypatch.setattr(protobase.database.time, "sleep", slept.append)
    bodies = 0
    for attempt in db.attempts(retries=5):
        with attempt as tx:
            bodies += 1
            tx.root["c"] = bodies
            if bodies <= 3:
                raise ConflictError(("c",), 0, 0)  # lost to a commit already visible: no wait for it
    assert bodies == 4 and attempt.committed and attempt.lost_to is None
    assert len(slept) == 1 and 0 <= slept[0] <= 0.001


def test_attempts_reraise_after_the_last_retry(db):
    with db.transaction() as tx:
        tx.root["c"] = 0
    bodies = 0
    with pytest.raises(ConflictError):
        for attempt in db.attempts(retries=2):
            with attempt as tx:
                bodies += 1
                tx.root["c"] = -1
                with db.transaction() as other:
                    other.root["c"] = bodies
    assert bodies == 3
    assert read(db, "c") == 3


def test_transactional_decorator_retries(db):
    with db.transaction() as tx:
        tx.root["c"] = 0
    calls = []

    @db.transactional(retries=4)
    def increment(tx, by):
        calls.append(by)
        tx.root["c"] = tx.root["c"] + by
        if len(calls) < 3:
            with db.transaction() as other:
                other.root["c"] = 10 * len(calls)
        return tx.root["c"]

    assert increment(5) == 25
    assert calls == [5, 5, 5]
    assert read(db, "c") == 25


def test_transactional_decorator_reraises(db):
    with db.transaction() as tx:
        tx.root["c"] = 0

    @db.transactional(retries=1)
    def always_conflicts(tx):
        tx.root["c"] = -1
        with db.transaction() as other:
            other.root["c"] = other.root["c"] + 1

    with pytest.raises(ConflictError):
        always_conflicts()
    assert read(db, "c") == 2


def test_attempts_do_not_swallow_other_errors(db):
    bodies = 0
    with pytest.raises(KeyError):
        for attempt in db.attempts(retries=3):
            with attempt as tx:
                bodies += 1
                tx.root["missing"]
    assert bodies == 1


# -- encoding errors ---------------------------------------------------------------------


def test_encoding_error_at_assignment_names_the_path(db):
    with db.transaction() as tx:
        tx.root["carts"] = {"u1": {}}
        tx.root["bl"] = list(range(300))
    with db.transaction() as tx:
        with pytest.raises(EncodingError, match=r"cannot store a value of type object at root\['x'\]\['a'\]\[1\]"):
            tx.root["x"] = {"a": [1, object()]}
        with pytest.raises(EncodingError, match=r"at root\['carts'\]\['u1'\]\['bad'\]"):
            tx.root["carts"]["u1"]["bad"] = object()
        with pytest.raises(EncodingError, match=r"cannot use a key of type list at root\['carts'\]"):
            tx.root["carts"][[1]] = 1  # type: ignore[index]
        with pytest.raises(EncodingError, match=r"cannot use NaN as a key at root\['k'\]\[nan\]"):
            tx.root["k"] = {float("nan"): 1}
        with pytest.raises(EncodingError, match=r"type complex at root\['bl'\]\[300\]"):
            tx.root["bl"].append(1j)
        with pytest.raises(EncodingError, match="type frozenset"):
            tx.root["s"] = {frozenset({1})}
        tx.root["fine"] = 1  # the transaction stays usable
    assert read(db, "fine") == 1 and "x" not in read(db)


def _cyclic_list():
    items: list = [1]
    items.append({"back": items})
    return items


def _nested(depth, kinds=(list, tuple, dict)):
    """An Item `depth` keys below the top of the value, inside containers of `kinds` in turn."""
    value: object = Item("innermost", 1)
    for level in range(depth):
        kind = kinds[level % len(kinds)]
        value = {"k": value} if kind is dict else kind([value])
    return value


def _store_inside_itself(tx):
    tx.root["a"]["b"] = tx.root["a"]


def _append_to_itself(tx):
    tx.root["big"].append(tx.root["big"])


def _assign_inside_its_own_new_dict(tx):
    tx.root["n"] = {"k": 1}
    tx.root["n"]["me"] = tx.root["n"]


def _small_list_append_to_itself(tx):
    items = tx.root["small"]
    items.append(items)


def _dataclass_field_to_itself(tx):
    item = tx.root["item"]
    item.name = item


def _deep_key_path(tx):
    target = tx.root
    for level in range(MAX_DEPTH):
        target[level] = {}
        target = target[level]
    target["too deep"] = []


LOSES_AT_ASSIGNMENT = {
    "cycle": (
        lambda tx: tx.root.__setitem__("c", _cyclic_list()),
        r"cannot store a value that contains itself: a list reappears inside itself at "
        r"root\['c'\]\[1\]\['back'\]",
    ),
    "wrapper-inside-itself": (_store_inside_itself, r"a TxDict reappears inside itself at root\['a'\]\['b'\]"),
    "tree-list-into-itself": (_append_to_itself, r"a TxList reappears inside itself at root\['big'\]\[300\]"),
    "new-dict-into-itself": (
        _assign_inside_its_own_new_dict,
        r"a LocalDict reappears inside itself at root\['n'\]\['me'\]",
    ),
    "small-list-into-itself": (
        _small_list_append_to_itself,
        r"a TrackedList reappears inside itself at root\['small'\]\[1\]",
    ),
    "dataclass-into-itself": (_dataclass_field_to_itself, r"reappears inside itself at root\['item'\]\['name'\]"),
    "too-deep": (
        lambda tx: tx.root.__setitem__("d", _nested(MAX_DEPTH + 1)),
        rf"cannot store a \w+ nested {MAX_DEPTH + 1} keys deep at root\['d'\]\[.*: values may nest at "
        rf"most {MAX_DEPTH} keys below the root",
    ),
    "too-deep-key-path": (_deep_key_path, rf"cannot store a list nested {MAX_DEPTH + 1} keys deep at root\[0\]\[1\]"),
    "surrogate-value": (
        lambda tx: tx.root.__setitem__("s", {"name": "caf\udce9"}),
        r"cannot store a str holding the lone surrogate '\\udce9' \(position 3\) at "
        r"root\['s'\]\['name'\]: text must be valid Unicode",
    ),
    "surrogate-key": (
        lambda tx: tx.root.__setitem__("caf\udce9", 1),
        r"lone surrogate '\\udce9' \(position 3\) at "
        r"root\['caf\\udce9'\]",
    ),
    "surrogate-nested-key": (lambda tx: tx.root.__setitem__("s", {"\ud800": 1}), r"lone surrogate .* at root\['s'\]"),
    "surrogate-element": (lambda tx: tx.root["tags"].add("\ud800"), r"lone surrogate .* at root\['tags'\]"),
    "decimal-nan-key": (
        lambda tx: tx.root.__setitem__("prices", {Decimal("NaN"): 1}),
        r"cannot use Decimal\('NaN'\) as a key at root\['prices'\]\[Decimal\('NaN'\)\]: a NaN is "
        r"not equal to itself",
    ),
    "decimal-snan-key": (lambda tx: tx.root.__setitem__(Decimal("sNaN"), 1), r"cannot use Decimal\('sNaN'\) as a key"),
    "decimal-nan-element": (lambda tx: tx.root["tags"].add(Decimal("-NaN")), r"cannot use Decimal\('-NaN'\) as a key"),
    "decimal-nan-in-tuple-key": (
        lambda tx: tx.root.__setitem__((1, Decimal("NaN")), 1),
        r"cannot use Decimal\('NaN'\) as a key",
    ),
}


@pytest.mark.parametrize(("write", "message"), LOSES_AT_ASSIGNMENT.values(), ids=LOSES_AT_ASSIGNMENT)
def test_bad_values_are_refused_at_assignment(db, write, message):
    with db.transaction() as tx:
        tx.root["a"] = {"x": 1}
        tx.root["big"] = list(range(300))
        tx.root["small"] = [1]
        tx.root["item"] = Item("apple", 3)
        tx.root["tags"] = set(range(100))
    tx = db.transaction()
    try:
        with pytest.raises(EncodingError, match=message):
            write(tx)
    finally:
        tx.abort()
    with db.transaction() as tx:  # the database is unharmed
        tx.root["after"] = 1
    assert read(db, "a") == {"x": 1} and read(db, "after") == 1 and len(read(db)) == 6
    db.check()


def test_values_nested_to_the_limit_are_stored_read_and_changed(db):
    with db.transaction() as tx:
        tx.root["deep"] = {"tuples": _nested(MAX_DEPTH - 2), "er": _nested(MAX_DEPTH - 2, (list, dict))}
    with db.snapshot() as snap:
        assert thaw(snap.root["deep"]) == {"tuples": _nested(MAX_DEPTH - 2), "er": _nested(MAX_DEPTH - 2, (list, dict))}
        assert json.dumps(snap.root["deep"], default=protobase.json_default).count("innermost") == 2
    with db.transaction() as tx:
        inner = tx.root["deep"]["er"]
        while not isinstance(inner, Item):
            inner = inner["k"] if isinstance(inner, Mapping) else inner[0]
        inner.qty = 2  # MAX_DEPTH keys below the root
    db.check()
    inner = read(db, "deep", "er")
    while not isinstance(inner, Item):
        inner = inner["k"] if isinstance(inner, Mapping) else inner[0]
    assert inner == Item("innermost", 2)


def test_encoding_error_at_small_list_append(db):
    with db.transaction() as tx:
        tx.root["l"] = [1]
    tx = db.transaction()
    try:
        with pytest.raises(EncodingError, match=r"root\['l'\]\[1\]"):
            tx.root["l"].append(object())
    finally:
        tx.abort()


def test_encoding_error_at_commit_for_small_list_append_names_the_path(db):
    with db.transaction() as tx:
        tx.root["l"] = [1]
    with pytest.raises(EncodingError, match=r"cannot store a value of type object at root\['l'\]\[1\]"):
        with db.transaction() as tx:
            tx.root["l"].append(object())
    assert read(db, "l") == [1]
    with db.transaction() as tx:  # the coordinator and the handle still work
        tx.root["l"].append(2)
    assert read(db, "l") == [1, 2]


@protobase.register_dataclass
@dataclasses.dataclass
class Item:
    name: str
    qty: int


def test_registered_dataclass_through_the_database(db):
    with db.transaction() as tx:
        tx.root["item"] = Item("apple", 3)
    with db.snapshot() as snap:
        assert snap.root["item"] == Item("apple", 3)


@protobase.register_dataclass
@dataclasses.dataclass
class Basket:
    owner: str
    items: list = dataclasses.field(default_factory=list)


@protobase.register_dataclass
@dataclasses.dataclass(frozen=True)
class Tag:
    label: str


def test_dataclass_attribute_changes_in_a_transaction_are_recorded(db):
    with db.transaction() as tx:
        tx.root["item"] = Item("apple", 3)
        tx.root["stock"] = {f"sku{i}": Item(f"sku{i}", i) for i in range(100)}  # a tree of dataclasses
        tx.root["small"] = [Item("pear", 1)]
        tx.root["big"] = [Item(f"n{i}", i) for i in range(300)]
        tx.root["basket"] = Basket("ann", [{"sku": "a"}])
        tx.root["tag"] = Tag("new")
    with db.transaction() as tx:
        item = tx.root["item"]
        item.qty += 1
        assert tx.root["item"] is item and item.qty == 4 and isinstance(item, Item) and item == Item("apple", 4)
        tx.root["stock"]["sku7"].qty = 70
        tx.root["small"][0].name = "nashi"
        tx.root["big"].insert(0, Item("first", -1))
        tx.root["big"][6].qty = 60  # Item("n5", 5), moved by the insert
        tx.root["basket"].items.append({"sku": "b"})
        tx.root["basket"].items[0]["sku"] = "A"
        assert tx.root["tag"] == Tag("new") and type(tx.root["tag"]) is Tag  # frozen: handed out as it is
    assert read(db, "item") == Item("apple", 4)
    assert read(db, "stock", "sku7") == Item("sku7", 70) and read(db, "stock", "sku8") == Item("sku8", 8)
    assert read(db, "small") == [Item("nashi", 1)]
    big = read(db, "big")
    assert big[:2] == [Item("first", -1), Item("n0", 0)] and big[6] == Item("n5", 60) and len(big) == 301
    assert read(db, "basket") == Basket("ann", [{"sku": "A"}, {"sku": "b"}])
    db.check()


def test_dataclass_attribute_change_conflicts_like_a_write_of_the_whole_value(db):
    with db.transaction() as tx:
        tx.root["item"] = Item("apple", 3)
    first, second = db.transaction(), db.transaction()
    first.root["item"].qty = 4
    second.root["item"].name = "pear"
    first.commit()
    with pytest.raises(ConflictError, match=r"key root\['item'\] was changed by commit"):
        second.commit()
    assert read(db, "item") == Item("apple", 4)


def test_dataclass_attribute_refusals_in_a_transaction(db):
    with db.transaction() as tx:
        tx.root["item"] = Item("apple", 3)
    tx = db.transaction()
    try:
        with pytest.raises(
            EncodingError,
            match=r"cannot delete attribute 'qty' of the Item at root\['item'\]: "
            r"a stored dataclass keeps every field; set it to None instead",
        ):
            del tx.root["item"].qty
        with pytest.raises(EncodingError, match=r"cannot store a value of type object at root\['item'\]\['qty'\]"):
            tx.root["item"].qty = object()
    finally:
        tx.abort()
    assert read(db, "item") == Item("apple", 3)


def test_set_element_of_a_big_list_is_changed_in_a_transaction(db):
    with db.transaction() as tx:
        tx.root["big"] = [{i, -i} for i in range(300)]
    with db.transaction() as tx:
        tx.root["big"][5].add(1000)
    assert read(db, "big", 5) == {5, -5, 1000}


def test_tree_dicts_inside_lists_are_changed_in_a_transaction(db):
    with db.transaction() as tx:
        tx.root["small"] = [{i: i for i in range(100)}]
        tx.root["big"] = [{i: i for i in range(100)}] + list(range(300))
    with db.snapshot() as snap:
        assert type(snap.root["small"][0]) is TreeDict and type(snap.root["big"][0]) is TreeDict
    with db.transaction() as tx:
        tx.root["small"][0][5] = "five"
        tx.root["big"][0][6] = "six"
    assert read(db, "small", 0)[5] == "five" and read(db, "big", 0)[6] == "six" and read(db, "big", 0)[7] == 7


# -- handles ---------------------------------------------------------------------------


def test_finished_transactions_refuse_use(db):
    with db.transaction() as tx:
        tx.root["a"] = {"x": 1}
    with db.transaction() as tx:
        kept = tx.root["a"]  # a wrapper of the snapshot value
        kept["z"] = 0
    with pytest.raises(DatabaseClosedError, match="this transaction is committed; start a new one"):
        tx.root["a"]
    with pytest.raises(DatabaseClosedError, match="committed"):
        tx.root["b"] = 1
    with pytest.raises(DatabaseClosedError, match="committed"):
        kept["y"] = 2
    with pytest.raises(DatabaseClosedError, match="committed"):
        tx.commit()
    aborted = db.transaction()
    aborted.abort()
    with pytest.raises(DatabaseClosedError, match="this transaction is aborted"):
        aborted.root["a"]
    with pytest.raises(DatabaseClosedError, match="aborted"):
        aborted.root["b"] = 1
    with pytest.raises(DatabaseClosedError, match="aborted"):
        len(aborted.root)
    with pytest.raises(DatabaseClosedError, match="aborted"):
        aborted.commit()
    assert read(db, "a") == {"x": 1, "z": 0}


def test_closing_the_database_ends_transactions_and_snapshots(db):
    with db.transaction() as tx:
        tx.root["a"] = 1
    tx = db.transaction()
    tx.root["a"] = 2
    snap = db.snapshot()
    assert snap.root["a"] == 1
    db.close()
    assert db.closed and not tx.active and snap.closed
    with pytest.raises(DatabaseClosedError):
        tx.root["a"]
    with pytest.raises(DatabaseClosedError):
        tx.commit()
    with pytest.raises(DatabaseClosedError, match="is closed"):
        _ = snap.root
    with pytest.raises(DatabaseClosedError, match=r"is closed; open it again with protobase.open\(\)"):
        db.snapshot()
    with pytest.raises(DatabaseClosedError):
        db.transaction()
    with pytest.raises(DatabaseClosedError):
        db.stats()
    db.close()  # idempotent
    assert "closed" in repr(db)


def test_closed_database_dropped_the_aborted_writes(datadir):
    with open_test_db(datadir) as db:
        with db.transaction() as tx:
            tx.root["a"] = 1
        tx = db.transaction()
        tx.root["a"] = 2
    with open_test_db(datadir) as db:
        assert read(db, "a") == 1


# -- check and stats ---------------------------------------------------------------------


def test_check_passes_after_a_series_of_commits(db):
    db.check()
    for n in range(30):
        with db.transaction() as tx:
            tx.root[f"k{n % 7}"] = {"n": n, "l": list(range(n * 20)), "s": set(range(n * 5))}
            if n % 5 == 0:
                tx.root.pop(f"k{(n + 3) % 7}", None)
        db.check()
    with db.transaction() as tx:
        tx.root["wide"] = {i: str(i) for i in range(3000)}
    with db.transaction() as tx:
        for i in range(0, 3000, 3):
            del tx.root["wide"][i]
    db.check()


def test_stats_is_a_frozen_record_with_plausible_fields(db):
    before = db.stats()
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.seq = 5  # type: ignore[misc]
    with db.transaction() as tx:
        tx.root["a"] = {"x": list(range(100))}
    after = db.stats()
    assert after.seq == before.seq + 1
    assert after.commits == before.commits + 1
    assert after.path == db.path and after.coordinator_pid == db.coordinator_pid
    assert after.segments >= 1 and after.data_bytes > 0 and after.shared_bytes >= after.data_bytes
    assert after.allocated_bytes > before.allocated_bytes
    assert 0 < after.live_bytes <= after.data_bytes
    assert after.reclaimable_bytes == after.data_bytes - after.live_bytes
    assert any(r.pid == __import__("os").getpid() for r in after.readers)
    assert after.taken_at >= before.taken_at


def test_stats_counts_conflicts(db):
    with db.transaction() as tx:
        tx.root["a"] = 0
    conflicts = db.stats().conflicts
    first, second = db.transaction(), db.transaction()
    first.root["a"] = 1
    second.root["a"] = 2
    first.commit()
    with pytest.raises(ConflictError):
        second.commit()
    assert db.stats().conflicts == conflicts + 1


def test_repeated_reads_decode_nothing_again(db):
    with db.transaction() as tx:
        tx.root["rec"] = {"x": [1, 2, 3]}
    with db.snapshot() as snap:
        snap.root["rec"]["x"]
        misses = db.stats().object_cache.misses
        for _ in range(10):
            with db.snapshot() as again:
                assert again.root["rec"]["x"] == [1, 2, 3]
        assert db.stats().object_cache.misses == misses  # the root's view, and what it read, are kept


def test_a_new_root_keeps_the_collections_it_shares_and_uncaches_those_it_replaced(db):
    # Views of superseded roots, and of the collections they had read, stayed cached until evicted:
    # in a client committing in a loop, 230k objects that every full collection of its GC walked.
    with db.transaction() as tx:
        tx.root["kept"] = {f"k{i}": i for i in range(200)}
        tx.root["written"] = {f"k{i}": i for i in range(200)}
    store = db.session.store
    with db.snapshot() as before:
        kept, written = before.root["kept"], before.root["written"]
        assert written["k1"] == 1 and -written.ptr in store.objects.data
    with db.transaction() as tx:
        tx.root["written"]["k1"] = -1
    with db.snapshot() as after:
        assert after.root["kept"] is kept  # carried over: the new root holds the same tree
        assert after.root["written"] is not written and after.root["written"]["k1"] == -1
    assert -written.ptr not in store.objects.data and -kept.ptr in store.objects.data
    assert store.latest_root is not None and store.latest_root.ptr == db.session.control.read_root()[1]


def test_write_through_makes_the_next_read_a_cache_hit(db):
    with db.transaction() as tx:
        tx.root["rec"] = {"name": "alice", "tags": ["a", "b"]}
    store = db.session.store
    with db.snapshot() as snap:
        ref = store.access.lookup(snap.root.ptr, "rec")  # the leaf slot: a Ref to the record's atom
        hits, misses = store.objects.hits, store.objects.misses
        value = store.resolve(ref)
        assert (store.objects.hits, store.objects.misses) == (hits + 1, misses)
        assert value == {"name": "alice", "tags": ["a", "b"]}
        assert type(value) is FrozenDict and type(value["tags"]) is FrozenList
        hits, misses = store.objects.hits, store.objects.misses
        assert snap.root["rec"] is value
        assert store.objects.misses == misses
