"""Snapshots (client/snapshot.py, core/views.py, core/frozen.py): isolation, read-only values, tree views."""

from __future__ import annotations

import ast
import copy
import csv
import dataclasses
import datetime as dt
import io
import json
import pickle
import pprint
from collections.abc import Mapping

import pytest

import protobase
from protobase import DatabaseClosedError, FrozenDict, FrozenList, FrozenSet, ReadOnlyError, TreeDict, TreeList, TreeSet
from protobase.core.frozen import read_only_dataclass, thaw

BIG_DICT = {i: {"n": i, "sq": i * i} for i in range(300)}
BIG_LIST = [f"item{i}" if i % 3 else {"i": i} for i in range(1000)]
BIG_SET = set(range(0, 600, 3)) | {"a", "b"}


@pytest.fixture
def filled(db):
    """A database holding small and big containers of every kind."""
    with db.transaction() as tx:
        tx.root["small"] = {"d": {"k": "v", "nested": {"deep": [1, 2]}}, "l": [1, [2, 3]], "s": {1, 2}, "t": (1, [2])}
        tx.root["bd"] = BIG_DICT
        tx.root["bl"] = BIG_LIST
        tx.root["bs"] = BIG_SET
        tx.root["lists_in_tree"] = {i: [i] for i in range(100)}
    return db


# -- isolation ---------------------------------------------------------------------------


def test_open_snapshot_keeps_its_sequence(db):
    with db.transaction() as tx:
        tx.root["a"] = {"v": 1}
        tx.root["bl"] = list(range(300))
    old = db.snapshot()
    try:
        seen = old.root["a"]
        for n in range(2, 6):
            with db.transaction() as tx:
                tx.root["a"]["v"] = n
                tx.root["bl"].append(n)
                tx.root[f"new{n}"] = n
        assert old.root["a"] == {"v": 1} and seen == {"v": 1}
        assert len(old.root["bl"]) == 300 and "new2" not in old.root and len(old.root) == 2
        with db.snapshot() as new:
            assert new.seq == old.seq + 4
            assert new.root["a"] == {"v": 5}
            assert list(new.root["bl"])[-4:] == [2, 3, 4, 5]
            assert {"new2", "new5"} <= set(new.root)
        assert old.root["a"] == {"v": 1}  # still
    finally:
        old.close()


def test_snapshot_pins_its_sequence_in_the_reader_table(db):
    with db.transaction() as tx:
        tx.root["a"] = 1
    import os

    with db.snapshot() as snap:
        with db.transaction() as tx:
            tx.root["a"] = 2
        mine = [r for r in db.stats().readers if r.pid == os.getpid()]
        assert mine and mine[0].snapshot_seq == snap.seq and mine[0].snapshot_age == 1
    mine = [r for r in db.stats().readers if r.pid == os.getpid()]
    assert mine[0].snapshot_seq is None


def test_closed_snapshot_refuses_reads(db):
    with db.transaction() as tx:
        tx.root["a"] = 1
    snap = db.snapshot()
    assert snap.root["a"] == 1
    snap.close()
    snap.close()  # idempotent
    assert snap.closed and "closed" in repr(snap)
    with pytest.raises(DatabaseClosedError, match=rf"snapshot {snap.seq} is closed; take a new one"):
        _ = snap.root
    with db.snapshot() as snap2:
        pass
    with pytest.raises(DatabaseClosedError):
        snap2.root["a"]


# -- read-only values --------------------------------------------------------------------


def _paths():
    """(path, expected type) of every read-only value kind in `filled`."""
    return [
        (("small",), FrozenDict),
        (("small", "d"), FrozenDict),
        (("small", "d", "nested"), FrozenDict),
        (("small", "d", "nested", "deep"), FrozenList),
        (("small", "l"), FrozenList),
        (("small", "l", 1), FrozenList),
        (("small", "s"), FrozenSet),
        (("small", "t", 1), FrozenList),
        (("bd",), TreeDict),
        (("bd", 5), FrozenDict),
        (("bl",), TreeList),
        (("bl", 3), FrozenDict),
        (("bs",), TreeSet),
        (("lists_in_tree", 7), FrozenList),
    ]


def _get(root, path):
    for key in path:
        root = root[key]
    return root


DICT_WRITES = {
    "setitem": lambda d: d.__setitem__("k", 1),
    "delitem": lambda d: d.__delitem__(next(iter(d))),
    "clear": lambda d: d.clear(),
    "pop": lambda d: d.pop(next(iter(d))),
    "popitem": lambda d: d.popitem(),
    "setdefault": lambda d: d.setdefault("new", 1),
    "update": lambda d: d.update({"new": 1}),
    "ior": lambda d: d.__ior__({"new": 1}),
}
LIST_WRITES = {
    "setitem": lambda v: v.__setitem__(0, 1),
    "setslice": lambda v: v.__setitem__(slice(0, 1), [1]),
    "delitem": lambda v: v.__delitem__(0),
    "iadd": lambda v: v.__iadd__([1]),
    "imul": lambda v: v.__imul__(2),
    "append": lambda v: v.append(1),
    "extend": lambda v: v.extend([1]),
    "insert": lambda v: v.insert(0, 1),
    "pop": lambda v: v.pop(),
    "remove": lambda v: v.remove(v[0]),
    "clear": lambda v: v.clear(),
    "sort": lambda v: v.sort(),
    "reverse": lambda v: v.reverse(),
}
SET_WRITES = {
    "add": lambda s: s.add(1000),
    "discard": lambda s: s.discard(next(iter(s))),
    "remove": lambda s: s.remove(next(iter(s))),
    "pop": lambda s: s.pop(),
    "clear": lambda s: s.clear(),
    "update": lambda s: s.update({1000}),
    "difference_update": lambda s: s.difference_update({1}),
    "intersection_update": lambda s: s.intersection_update({1}),
    "symmetric_difference_update": lambda s: s.symmetric_difference_update({1}),
}


@pytest.mark.parametrize(
    ("path", "kind"), _paths(), ids=lambda p: "/".join(map(str, p)) if isinstance(p, tuple) else p.__name__
)
def test_every_write_through_a_snapshot_value_raises(filled, path, kind):
    with filled.snapshot() as snap:
        value = _get(snap.root, path)
        assert type(value) is kind
        before = thaw(value)
        writes = {
            FrozenDict: DICT_WRITES,
            TreeDict: DICT_WRITES,
            FrozenList: LIST_WRITES,
            TreeList: LIST_WRITES,
            FrozenSet: SET_WRITES,
            TreeSet: SET_WRITES,
        }[kind]
        for name, write in writes.items():
            with pytest.raises(ReadOnlyError, match="read-only; change them inside"):
                write(value)
            assert thaw(value) == before, name
    with filled.snapshot() as snap:
        assert thaw(_get(snap.root, path)) == before  # nothing leaked into the shared cache


def test_root_is_read_only(filled):
    with filled.snapshot() as snap:
        for write in DICT_WRITES.values():
            with pytest.raises(ReadOnlyError):
                write(snap.root)
        assert set(snap.root) == {"small", "bd", "bl", "bs", "lists_in_tree"}


def test_augmented_assignment_through_a_snapshot_raises(filled):
    with filled.snapshot() as snap:
        root = snap.root
        with pytest.raises(ReadOnlyError):
            root["small"]["l"] += [4]
        with pytest.raises(ReadOnlyError):
            root["small"]["d"]["nested"]["deep"] += [3]
        with pytest.raises(ReadOnlyError):
            root["bl"] += ["x"]
        with pytest.raises(ReadOnlyError):
            root["bd"][5]["n"] += 1
        with pytest.raises(ReadOnlyError):
            root["small"]["s"] |= {9}  # a frozenset makes a new set; storing it back is the write
        with pytest.raises(ReadOnlyError):
            root["bs"] |= {9}
        with pytest.raises(ReadOnlyError):
            root["small"]["d"] |= {"x": 1}
        items = root["small"]["l"]
        with pytest.raises(ReadOnlyError):
            items += [4]
        with pytest.raises(ReadOnlyError):
            items *= 2
        assert root["small"]["l"] == [1, [2, 3]] and len(root["bl"]) == len(BIG_LIST)


def test_snapshot_values_do_not_change_under_later_transactions(filled):
    with filled.snapshot() as snap:
        small = snap.root["small"]
        with filled.transaction() as tx:
            tx.root["small"]["l"].append(99)
            tx.root["small"]["d"]["k"] = "changed"
            tx.root["bd"][5]["n"] = "changed"
        assert small["l"] == [1, [2, 3]] and small["d"]["k"] == "v"
        assert snap.root["bd"][5]["n"] == 5
    with filled.snapshot() as snap:
        assert snap.root["small"]["l"] == [1, [2, 3], 99]
        assert snap.root["bd"][5]["n"] == "changed"


def test_thaw_gives_an_independent_mutable_copy(filled):
    with filled.snapshot() as snap:
        plain = thaw(snap.root["small"])
        plain["l"][1].append(4)
        plain["s"].add(3)
        plain["d"]["nested"]["deep"].clear()
        assert snap.root["small"]["l"] == [1, [2, 3]] and snap.root["small"]["s"] == {1, 2}
        assert snap.root["small"]["d"]["nested"]["deep"] == [1, 2]
        assert type(plain) is dict and type(plain["s"]) is set and type(plain["l"]) is list


# -- tree views read like their builtins ---------------------------------------------------------


def test_tree_dict_reads_like_a_dict(filled):
    with filled.snapshot() as snap:
        view = snap.root["bd"]
        assert isinstance(view, Mapping) and not isinstance(view, dict)  # its storage is the tree, not a dict's
        assert len(view) == len(BIG_DICT) and bool(view)
        assert view == BIG_DICT and BIG_DICT == view and not (view != BIG_DICT)
        assert view != {**BIG_DICT, 0: None}
        assert sorted(view) == sorted(BIG_DICT)
        assert list(view) == sorted(BIG_DICT)  # ordered by key
        assert list(reversed(view)) == sorted(BIG_DICT, reverse=True)
        assert 5 in view and 10_000 not in view and "5" not in view
        assert view[5] == {"n": 5, "sq": 25} and view.get(5) == {"n": 5, "sq": 25}
        assert view.get(10_000) is None and view.get(10_000, "d") == "d"
        with pytest.raises(KeyError):
            view[10_000]
        assert dict(view.items()) == BIG_DICT and list(view.keys()) == sorted(BIG_DICT)
        assert list(view.values()) == [BIG_DICT[k] for k in sorted(BIG_DICT)]
        assert len(view.items()) == len(BIG_DICT) and (5, {"n": 5, "sq": 25}) in view.items()
        assert view.keys() & {1, 2, 10_000} == {1, 2}
        assert dict(view) == BIG_DICT and {**view} == BIG_DICT
        assert view.copy() == BIG_DICT and type(view.copy()) is dict
        assert (view | {"x": 1})["x"] == 1 and len(view | {"x": 1}) == len(BIG_DICT) + 1
        assert thaw(view) == BIG_DICT and type(thaw(view)) is dict
        assert pickle.loads(pickle.dumps(view)) == BIG_DICT
        assert copy.deepcopy(view) == BIG_DICT


def test_tree_dict_len_and_iteration_do_not_depend_on_what_was_read(filled):
    with filled.snapshot() as snap:
        view = snap.root["bd"]
        view[3], view[4]  # fill the memo partly
        assert len(view) == len(BIG_DICT) and list(view) == sorted(BIG_DICT) and view == BIG_DICT


def test_tree_list_reads_like_a_list(filled):
    with filled.snapshot() as snap:
        view = snap.root["bl"]
        assert len(view) == len(BIG_LIST)
        assert list(view) == BIG_LIST and view == BIG_LIST and view == tuple(BIG_LIST)
        assert view != BIG_LIST[:-1] and view != BIG_LIST[:-1] + ["other"]
        assert view[0] == BIG_LIST[0] and view[-1] == BIG_LIST[-1] and view[500] == BIG_LIST[500]
        with pytest.raises(IndexError):
            view[len(BIG_LIST)]
        with pytest.raises(IndexError):
            view[-len(BIG_LIST) - 1]
        for sl in (
            slice(10, 20),
            slice(None, 5),
            slice(-5, None),
            slice(None, None, 7),
            slice(900, 10, -3),
            slice(5, 5),
            slice(2000, 3000),
        ):
            assert view[sl] == BIG_LIST[sl], sl
        assert "item1" in view and "nope" not in view and {"i": 3} in view
        assert view.index("item2") == 2 and view.count({"i": 0}) == 1
        assert list(reversed(view))[:3] == BIG_LIST[::-1][:3]
        assert thaw(view) == BIG_LIST and type(thaw(view)) is list
        assert pickle.loads(pickle.dumps(view)) == BIG_LIST


def test_tree_set_reads_like_a_set(filled):
    with filled.snapshot() as snap:
        view = snap.root["bs"]
        assert len(view) == len(BIG_SET)
        assert view == BIG_SET and BIG_SET == view and set(view) == BIG_SET
        assert view == frozenset(BIG_SET)
        assert 3 in view and 4 not in view and "a" in view
        assert view | {4} == BIG_SET | {4} and view & {3, 4} == {3} and view - {3} == BIG_SET - {3}
        assert view <= BIG_SET | {4} and not view < BIG_SET
        assert view.isdisjoint({4, 5}) and not view.isdisjoint({3})
        assert hash(view) == hash(view)
        assert thaw(view) == BIG_SET and type(thaw(view)) is set


def test_empty_trees_after_removing_everything(db):
    with db.transaction() as tx:
        tx.root["bd"] = {i: i for i in range(100)}
        tx.root["bl"] = list(range(300))
    with db.transaction() as tx:
        for i in range(100):
            del tx.root["bd"][i]
        for _ in range(300):
            del tx.root["bl"][0]
    with db.snapshot() as snap:
        assert len(snap.root["bd"]) == 0 and list(snap.root["bd"]) == [] and snap.root["bd"] == {}
        assert len(snap.root["bl"]) == 0 and list(snap.root["bl"]) == []
    db.check()


# -- compaction -----------------------------------------------------------------------------


def test_compact_keeps_data_identical_and_check_passes(filled):
    db = filled
    for n in range(20):  # make garbage: rewrite records and tree entries
        with db.transaction() as tx:
            tx.root["small"]["l"].append(n)
            tx.root["bd"][n] = {"n": -n}
            tx.root["bl"][n] = n
            tx.root["churn"] = {"n": n, "payload": "x" * 2000}
    with db.snapshot() as snap:
        before = thaw(snap.root)
        seq = snap.seq
    db.check()
    published = db.compact()
    assert published >= seq
    db.check()
    with db.snapshot() as snap:
        assert thaw(snap.root) == before
        assert type(snap.root["bd"]) is TreeDict and type(snap.root["bl"]) is TreeList
    with db.transaction() as tx:  # and it keeps working after
        tx.root["after"] = [1]
        tx.root["bd"][0] = "zero"
    db.check()
    with db.snapshot() as snap:
        assert snap.root["after"] == [1] and snap.root["bd"][0] == "zero"
    assert db.stats().compactions >= 1


def test_snapshot_open_across_a_compaction_still_reads(filled):
    db = filled
    with db.snapshot() as old:
        expected = thaw(old.root)
        with db.transaction() as tx:
            tx.root["bd"][1] = "changed"
        db.compact()
        assert thaw(old.root) == expected
    with db.snapshot() as snap:
        assert snap.root["bd"][1] == "changed"
    db.check()


def test_a_client_that_notices_a_compaction_unmaps_the_old_segments_and_keeps_its_decoded_objects(filled):
    db = filled
    store = db.session.store
    with db.snapshot() as snap:
        expected = thaw(snap.root)
    cached = len(store.objects.data)
    assert cached and len(store.bytes.data)
    db.compact()
    with db.snapshot() as snap:  # the first pin after it notices the compaction
        oldest = db.session.control.oldest_segment
        assert not store.bytes.data and all(index >= oldest for index in store.reader.buffers)
        # The old atoms' objects age out instead of being freed at once, on this transaction's time.
        assert len(store.objects.data) >= cached
        assert thaw(snap.root) == expected
    db.check()


# -- what C-level and stdlib consumers see ---------------------------------------------------------

CARTS = {f"u{i:03}": {"items": [f"sku{i}", f"sku{i + 1}"], "total": i} for i in range(100)}
ROWS = [{"n": i} for i in range(300)]
WIDE = {f"c{i:03}": i for i in range(100)}


@pytest.fixture
def web(db):
    """What a web app stores: tree dicts and lists, also nested in a small dict, and sets."""
    with db.transaction() as tx:
        tx.root["carts"] = CARTS
        tx.root["rows"] = ROWS
        tx.root["wide"] = WIDE
        tx.root["page"] = {
            "carts": CARTS,
            "rows": ROWS,
            "tags": {3, 1, 2},
            "ids": set(range(100, 0, -1)),
            "mixed": {"b", 1, None},
        }
    return db


def test_json_dumps_of_a_tree_dict_or_list_refuses_instead_of_writing_nothing(web):
    with web.snapshot() as snap:
        carts, rows = snap.root["carts"], snap.root["rows"]
        carts["u005"]  # a partly filled memo must not show through either
        for view in (carts, rows):
            with pytest.raises(TypeError, match=f"Object of type {type(view).__name__} is not JSON serializable"):
                json.dumps(view)
        assert json.loads(json.dumps(carts, default=protobase.json_default)) == CARTS
        assert json.loads(json.dumps(rows, default=protobase.json_default)) == ROWS


def test_json_default_writes_views_nested_in_frozen_dicts_and_sets_in_key_order(web):
    with web.snapshot() as snap:
        page = snap.root["page"]
        kinds = {key: type(value) for key, value in page.items()}
        assert kinds == {"carts": TreeDict, "rows": TreeList, "tags": FrozenSet, "ids": TreeSet, "mixed": FrozenSet}
        written = json.loads(json.dumps(page, default=protobase.json_default))
    assert written == {
        "carts": CARTS,
        "rows": ROWS,
        "tags": [1, 2, 3],
        "ids": list(range(1, 101)),
        "mixed": [None, 1, "b"],
    }


def test_json_default_refuses_other_types_naming_them(web):
    with pytest.raises(
        TypeError,
        match="Object of type datetime is not JSON serializable; protobase.json_default writes ProtoBase's containers",
    ):
        json.dumps({"when": dt.datetime(2024, 1, 1)}, default=protobase.json_default)


def test_stdlib_consumers_see_the_whole_tree_dict_and_list(web):
    with web.snapshot() as snap:
        carts, rows, wide = snap.root["carts"], snap.root["rows"], snap.root["wide"]
        carts["u005"], wide["c001"]  # partly filled memos
        assert copy.copy(carts) == CARTS and copy.deepcopy(carts) == CARTS and type(copy.copy(carts)) is dict
        assert copy.copy(rows) == ROWS and copy.deepcopy(rows) == ROWS and type(copy.copy(rows)) is list
        assert pickle.loads(pickle.dumps(carts)) == CARTS and pickle.loads(pickle.dumps(rows)) == ROWS
        assert {**carts} == CARTS and dict(carts) == CARTS and list(carts) == sorted(CARTS)
        assert list(rows) == ROWS and [*rows] == ROWS
        assert "{u042[total]} {u099[items][1]}".format_map(carts) == "42 sku100"
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=sorted(WIDE))
        writer.writeheader()
        writer.writerow(wide)
        assert list(csv.DictReader(io.StringIO(out.getvalue()))) == [{key: str(v) for key, v in WIDE.items()}]
        assert pprint.pformat(carts) == repr(carts) == f"TreeDict(<100 keys at {carts.ptr:#x}>)"  # a summary
        assert ast.literal_eval(pprint.pformat(protobase.thaw(carts))) == CARTS


def test_thaw_copies_views_nested_in_frozen_dicts_to_builtins(web):
    with web.snapshot() as snap:
        plain = protobase.thaw(snap.root["page"])
    assert plain == {
        "carts": CARTS,
        "rows": ROWS,
        "tags": {1, 2, 3},
        "ids": set(range(1, 101)),
        "mixed": {"b", 1, None},
    }
    assert [type(plain[key]) for key in ("carts", "rows", "tags", "ids")] == [dict, list, set, set]
    assert type(plain["carts"]["u001"]) is dict and type(plain["carts"]["u001"]["items"]) is list
    plain["carts"]["u001"]["items"].append("x")  # its own copy
    with web.snapshot() as snap:
        assert snap.root["carts"]["u001"] == CARTS["u001"]


# -- dataclasses --------------------------------------------------------------------------------


@protobase.register_dataclass
@dataclasses.dataclass
class Item:
    name: str
    qty: int
    tags: list = dataclasses.field(default_factory=list)


@protobase.register_dataclass
@dataclasses.dataclass(slots=True, order=True, unsafe_hash=True)
class Version:
    major: int
    minor: int


@protobase.register_dataclass
@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: int


def test_dataclass_read_from_a_snapshot_is_read_only_and_the_shared_copy_unchanged(db):
    with db.transaction() as tx:
        tx.root["item"] = Item("apple", 3, ["fruit"])
    with db.snapshot() as snap:
        item = snap.root["item"]
        with pytest.raises(
            ReadOnlyError,
            match=r"cannot set Item.qty: values read from a snapshot are read-only; "
            r"change them inside .* \(or make a changed copy with "
            r"dataclasses.replace\(\)\)",
        ):
            item.qty = 99
        with pytest.raises(ReadOnlyError, match="cannot set Item.name"):
            del item.name
        with pytest.raises(ReadOnlyError):
            item.tags.append("x")
        assert item == Item("apple", 3, ["fruit"])
    with db.snapshot() as snap:  # the process's cached copy, which every snapshot shares
        assert snap.root["item"] == Item("apple", 3, ["fruit"])
    with db.transaction() as tx:
        assert tx.root["item"].qty == 3


def test_dataclass_changed_by_its_writer_after_commit_does_not_change_the_cache(db):
    item = Item("apple", 3, ["fruit"])
    with db.transaction() as tx:
        tx.root["item"] = item
    item.qty = 4  # the caller's own instance, which the commit must not have cached
    item.tags.append("red")
    with db.snapshot() as snap:
        assert snap.root["item"] == Item("apple", 3, ["fruit"])
        with pytest.raises(ReadOnlyError):
            snap.root["item"].qty = 5


def test_snapshot_dataclass_compares_prints_copies_and_pickles_as_its_class(db):
    with db.transaction() as tx:
        tx.root["item"] = Item("apple", 3)
        tx.root["versions"] = [Version(1, 2), Version(1, 10)]
        tx.root["point"] = Point(1, 2)
    with db.snapshot() as snap:
        item, versions, point = snap.root["item"], snap.root["versions"], snap.root["point"]
        assert isinstance(item, Item) and type(item) is not Item and dataclasses.is_dataclass(item)
        assert item == Item("apple", 3) and Item("apple", 3) == item and item != Item("apple", 4)
        assert repr(item) == "Item(name='apple', qty=3, tags=FrozenList([]))"
        assert versions[0] < Version(1, 10) and Version(1, 1) < versions[0]
        assert sorted(versions, reverse=True) == [Version(1, 10), Version(1, 2)]
        assert hash(versions[0]) == hash(Version(1, 2)) and versions[0] in {Version(1, 2)}
        with pytest.raises(ReadOnlyError):
            versions[0].major = 2
        assert type(point) is Point and read_only_dataclass(Point) is Point  # frozen already
        changed = dataclasses.replace(item, qty=4)
        assert type(changed) is Item and changed == Item("apple", 4)
        changed.qty = 5  # a plain instance of the user's class
        for duplicate in (copy.copy(item), copy.deepcopy(item), pickle.loads(pickle.dumps(item)), thaw(item)):
            assert type(duplicate) is Item and duplicate == item
            duplicate.qty = 7
        assert type(thaw(item).tags) is list
        assert snap.root["item"].qty == 3
