"""Bulk writes: trees built bottom-up (core/btree/build.py) and the writer's bulk paths (coordinator/writer.py).

A merge of many sorted entries must hold exactly what assigning them one by
one holds, keep every tree invariant, report exactly the clean nodes it stops
using, and never change an older version. The writer's `apply_all` must
build the same data and the same indexes as `apply` op by op, and write the
same bytes for each record. End to end: a bulk load and a bulk merge into an
indexed collection pass `db.check()`, read back what was written, and a
coordinator killed during a bulk commit loses nothing acknowledged.
"""

from __future__ import annotations

import contextlib
import random
import signal
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protobase.coordinator import writer as writer_module
from protobase.core import codec
from protobase.core.arena import DICT_LEAF, INDEXED, SET_LEAF, VALUE
from protobase.core.btree import MAX_ENTRIES, merge_entries, sorted_keys
from protobase.core.codec import Ref
from protobase.keyorder import order_key
from protobase.settings import Settings
from protobase.shm import instance_entries, sweep
from protobase.wire.framing import LARGE_BODY
from protobase.wire.opcodes import OP_CREATE_INDEX, OP_DELETE, OP_SET, OP_SET_ADD
from tests.conftest import open_test_db, wait_for_coordinator_exit, wait_until
from tests.test_btree import MemoryAtoms, no_values
from tests.test_writer import Fixture

_keys = st.integers(-50, 2000) | st.text(alphabet="abcd", max_size=3) | st.tuples(st.integers(0, 3), st.booleans())
_values = st.integers() | st.text(max_size=4) | st.none()


def reachable(mem: MemoryAtoms, ptr: int) -> set[int]:
    """Pointers of every node of the clean tree at `ptr`."""
    if not ptr:
        return set()
    node = mem.load(ptr)
    found = {ptr}
    if node.sizes is not None:
        for child in node.values:
            found |= reachable(mem, child)
    return found


def assigned_one_by_one(mem: MemoryAtoms, root: Any, pairs: list[tuple[Any, Any]], kind: int) -> Any:
    for key, value in pairs:
        root = mem.access.assign(root, key, value, kind)[0]
    return root


def unique_by_order(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """{key -> last value}, keys equal in the canonical order (1 and 1.0 and True) counted once."""
    merged: dict[Any, Any] = {}
    for key, value in pairs:
        merged[key] = value
    return merged


# -- btree/build.py: merge_entries ------------------------------------------------------------


@given(
    st.lists(st.tuples(_keys, _values), max_size=600),
    st.lists(st.tuples(_keys, _values), min_size=1, max_size=600),
    st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_a_merge_holds_what_assigning_one_by_one_holds_and_keeps_every_invariant(before, added, clean):
    mem = MemoryAtoms()
    discarded: list[int] = []
    mem.access.on_discard = discarded.append
    root = assigned_one_by_one(mem, 0, before, DICT_LEAF)
    if clean:
        root = mem.flush(root)
    old_nodes = reachable(mem, root) if clean else set()
    old_items = list(mem.access.items(root))

    batch = unique_by_order(added)
    keys = sorted_keys(batch)
    merged, replaced = merge_entries(mem.access, root, keys, [batch[key] for key in keys], DICT_LEAF)

    reference = MemoryAtoms()
    expected = assigned_one_by_one(reference, 0, before + added, DICT_LEAF)
    assert list(mem.access.items(merged)) == list(reference.access.items(expected))
    assert mem.access.check_tree(merged, DICT_LEAF, no_values) == len(unique_by_order(before + added))
    had = unique_by_order(before)
    assert sorted(replaced, key=lambda pair: order_key(pair[0])) == sorted(
        ((key, had[key]) for key in batch if key in had), key=lambda pair: order_key(pair[0])
    )
    if clean:
        assert list(mem.access.items(root)) == old_items, "the older version changed"
        new_root = mem.flush(merged)
        assert mem.access.check_tree(new_root, DICT_LEAF, no_values) == len(unique_by_order(before + added))
        # Exactly the clean nodes the new version no longer uses were reported, each once.
        assert sorted(discarded) == sorted(old_nodes - reachable(mem, new_root))


def test_a_merge_matches_one_by_one_assignment_on_a_deep_tree_with_mixed_key_families():
    rng = random.Random(12)
    family = [lambda i: i, lambda i: f"k{i:05d}", lambda i: (i % 7, f"{i}"), lambda i: float(i) + 0.5]
    before = [(family[i % 4](i), i) for i in rng.sample(range(30_000), 12_000)]
    added = [(family[i % 4](i), -i) for i in rng.sample(range(30_000), 9_000)]
    mem = MemoryAtoms()
    root = mem.flush(assigned_one_by_one(mem, 0, before, DICT_LEAF))
    batch = unique_by_order(added)
    keys = sorted_keys(batch)
    merged = mem.flush(merge_entries(mem.access, root, keys, [batch[key] for key in keys], DICT_LEAF)[0])
    model = unique_by_order(before + added)
    assert mem.access.check_tree(merged, DICT_LEAF, no_values) == len(model)
    assert list(mem.access.items(merged)) == sorted(model.items(), key=lambda item: order_key(item[0]))


def test_a_load_into_an_empty_tree_fills_every_leaf():
    mem = MemoryAtoms()
    count = 64 * 64 * 3 + 10  # three levels
    keys = list(range(count))
    root = mem.flush(merge_entries(mem.access, 0, keys, [k * 2 for k in keys], DICT_LEAF)[0])
    assert mem.access.check_tree(root, DICT_LEAF, no_values) == count
    widths: list[int] = []

    def leaves(ptr: int) -> None:
        node = mem.load(ptr)
        if node.sizes is None:
            widths.append(node.width())
        else:
            for child in node.values:
                leaves(child)

    leaves(root)
    assert len(widths) == -(-count // MAX_ENTRIES), "as few leaves as hold the entries"
    assert min(widths) >= MAX_ENTRIES - 1


@given(st.lists(_keys, max_size=500), st.lists(_keys, min_size=1, max_size=500))
@settings(max_examples=80, deadline=None)
def test_a_set_tree_merge_holds_the_union(before, added):
    mem = MemoryAtoms()
    root = mem.flush(assigned_one_by_one(mem, 0, [(key, None) for key in before], SET_LEAF))
    merged = merge_entries(mem.access, root, sorted_keys(set(added)), None, SET_LEAF)[0]
    model = set(before) | set(added)
    assert mem.access.check_tree(merged, SET_LEAF, no_values) == len(model)
    assert list(mem.access.keys(merged, SET_LEAF)) == sorted(model, key=order_key)


# -- coordinator/writer.py: apply_all against apply, op by op ------------------------------------


@contextlib.contextmanager
def writer_on_arena(**options: Any) -> Iterator[Fixture]:
    """A writer on a fresh arena (tests/test_writer.py's Fixture), its segments removed after."""
    fixture = Fixture(Settings(**options))
    try:
        yield fixture
    finally:
        fixture.close()
        assert sweep(fixture.instance) == [], "the arena left segments behind"
        assert instance_entries(fixture.instance) == []


@pytest.fixture
def make() -> Iterator[Any]:
    with contextlib.ExitStack() as stack:
        yield lambda **options: stack.enter_context(writer_on_arena(**options))


def apply_each(fixture: Fixture, root: Any, ops: list[tuple[int, tuple[Any, ...], Any]]) -> int:
    for code, path, argument in ops:
        root = fixture.writer.apply(root, code, path, argument)
    return fixture.writer.flush(root)


def apply_all(fixture: Fixture, root: Any, ops: list[tuple[int, tuple[Any, ...], Any]]) -> int:
    return fixture.writer.flush(fixture.writer.apply_all(root, ops))


def indexes_of(fixture: Fixture, root: int, path: tuple[Any, ...]) -> dict[Any, list[Any]]:
    """{field -> its index's entries, in order} of the indexed collection at `path`."""
    access = fixture.writer.access
    slot = access.lookup(root, path[0])
    for key in path[1:]:
        slot = access.lookup(slot.ptr, key)
    assert type(slot) is Ref and slot.kind == INDEXED
    fields = codec.decode(fixture.writer.store.atom(slot.ptr)[1], frozen=False)
    for ptr in [fields["data"], *fields["indexes"].values()]:
        kind = SET_LEAF if ptr != fields["data"] else DICT_LEAF
        access.check_tree(ptr, kind, no_values)
    return {field: list(access.keys(ptr, SET_LEAF)) for field, ptr in fields["indexes"].items()}


def record_bytes(fixture: Fixture, root: int, path: tuple[Any, ...]) -> dict[Any, bytes | Any]:
    """{key -> the payload of its record's atom (or its inline value)} of the dict tree at `path`."""
    access = fixture.writer.access
    slot = access.lookup(root, path[0])

    def stored(value: Any) -> Any:
        if type(value) is not Ref:
            return value
        if value.kind != VALUE:
            return ("tree", value.kind)
        payload = bytes(fixture.writer.store.atom(value.ptr)[1])
        # A value holding a Ref (long text in an atom of its own) names an atom that differs
        # between the two roots; read() compares what they hold.
        return "holds a Ref" if codec.may_hold_refs(payload) else payload

    if slot.kind == VALUE:  # a small collection: one atom
        return {"the collection": stored(slot)}
    if slot.kind == INDEXED:
        slot = Ref(codec.decode(fixture.writer.store.atom(slot.ptr)[1], frozen=False)["data"], DICT_LEAF)
    return {key: stored(value) for key, value in access.items(slot.ptr)}


_fields = st.integers(-5, 5) | st.text(alphabet="xyz", max_size=3) | st.none() | st.booleans()
_records = st.fixed_dictionaries(
    {"city": st.sampled_from(["Paris", "Lyon", "Nice"]) | st.integers(0, 3), "score": st.integers(0, 9)},
    optional={
        "tags": st.lists(st.sampled_from("abc"), max_size=3),
        "note": st.text(alphabet="n", min_size=0, max_size=700),  # past inline_bytes: an atom of its own
        "extra": _fields,
    },
)
_record_keys = st.text(alphabet="uvw", min_size=1, max_size=4) | st.integers(0, 300)


@pytest.mark.parametrize("indexed", [False, True], ids=["plain", "indexed"])
@given(
    before=st.dictionaries(_record_keys, _records, max_size=120),
    written=st.lists(st.tuples(_record_keys, _records | _fields), min_size=1, max_size=200),
)
@settings(max_examples=25, deadline=None)
def test_many_sets_into_one_collection_build_what_op_by_op_builds(indexed, before, written):
    with writer_on_arena() as fixture:
        check_many_sets(fixture, indexed, before, written)


def check_many_sets(fixture: Fixture, indexed: bool, before: dict[Any, Any], written: list[Any]) -> None:
    root = fixture.commit(0, (OP_SET, ("n",), 1), (OP_SET, ("users",), before))
    if indexed:
        root = fixture.commit(
            root, (OP_CREATE_INDEX, ("users",), "city"), (OP_CREATE_INDEX, ("users",), ("city", "score"))
        )
    ops = [(OP_SET, ("users", key), value) for key, value in written]
    one_by_one = apply_each(fixture, root, ops)
    bulk = apply_all(fixture, root, ops)
    assert fixture.read(bulk) == fixture.read(one_by_one)
    assert record_bytes(fixture, bulk, ("users",)) == record_bytes(fixture, one_by_one, ("users",))
    if indexed:
        assert indexes_of(fixture, bulk, ("users",)) == indexes_of(fixture, one_by_one, ("users",))
    assert fixture.read(root)["users"] == before, "the root it was applied to changed"


def test_runs_of_sets_are_merged_in_the_order_of_the_ops_around_other_operations(make):
    fixture = make()
    root = fixture.commit(0, (OP_SET, ("users",), {}), (OP_SET, ("tags",), set(range(100))))
    many = writer_module.MERGE_AT_LEAST * 3
    ops = (
        [(OP_SET, ("users", f"u{i}"), {"n": i}) for i in range(many)]
        + [(OP_DELETE, ("users", "u3"), None), (OP_SET, ("flag",), True)]
        + [(OP_SET, ("users", f"u{i}"), {"n": -i}) for i in range(0, many, 2)]
        + [(OP_SET, ("users",), {"replaced": 1})]
        + [(OP_SET, ("users", f"v{i}"), i) for i in range(many)]
        + [(OP_SET_ADD, ("tags",), list(range(50, 400)))]
        + [(OP_SET, (f"top{i}",), i) for i in range(many)]  # into the root itself
    )
    assert fixture.read(apply_all(fixture, root, ops)) == fixture.read(apply_each(fixture, root, ops))


def test_a_run_of_sets_into_a_missing_container_fails_as_op_by_op(make):
    fixture = make()
    root = fixture.commit(0, (OP_SET, ("n",), 1))
    ops = [(OP_SET, ("users", f"u{i}"), i) for i in range(writer_module.MERGE_AT_LEAST * 2)]
    with pytest.raises(Exception) as one_by_one:
        apply_each(fixture, root, ops)
    with pytest.raises(type(one_by_one.value)) as bulk:
        apply_all(fixture, root, ops)
    assert str(bulk.value) == str(one_by_one.value)


@given(st.lists(_records | st.dictionaries(st.text(max_size=3), _fields, max_size=70), min_size=1, max_size=80))
@settings(max_examples=60, deadline=None)
def test_a_record_written_by_the_fast_path_has_the_bytes_of_the_general_path(records):
    with writer_on_arena() as fixture:
        writer = fixture.writer
        for record in records:
            fast = writer._flat_record(record)  # the fast path, or None: the general one lays it out
            if fast is not None:
                assert fast == codec.encode(writer._inline(record))
                assert len(fast) <= writer.flat_max_bytes


def test_a_flush_names_at_most_write_through_at_most_values(make):
    fixture = make()
    count = writer_module.WRITE_THROUGH_AT_MOST + 100
    records = [{"n": i} for i in range(count)]
    root = fixture.writer.apply_all(0, [(OP_SET, ("users",), {})])
    root = fixture.writer.flush(root)
    fixture.writer.begin()  # a new working root, as Commits starts each group
    root = fixture.writer.apply_all(root, [(OP_SET, ("users", i), record) for i, record in enumerate(records)])
    fixture.writer.flush(root)
    named = [fixture.writer.flat_pointer(record) for record in records]
    assert sum(ptr is not None for ptr in named) == writer_module.WRITE_THROUGH_AT_MOST
    for record, ptr in zip(records, named):
        if ptr is not None:
            assert codec.decode(fixture.writer.store.atom(ptr)[1], frozen=False) == record


def test_a_load_of_records_kept_as_their_bytes_writes_the_atoms_of_plain_dicts(make):
    # Past the values a flush names, a leaf of Packed records is written in one call (Writer._write_leaf):
    # the same atoms, at the same places, as the record-by-record path writes for the dicts they stand for.
    records = {f"k{i:05d}": {"n": i, "name": f"user{i}"} for i in range(writer_module.WRITE_THROUGH_AT_MOST + 500)}
    written = []
    for kept in (True, False):
        fixture = make()
        ops = writer_module.decode_ops(
            codec.encode([[OP_SET, ["users"], records]]), fixture.writer.records if kept else None
        )
        if kept:  # in two lists, its records as their bytes
            assert type(ops[0][2]) is codec.SortedEntries and type(ops[0][2].values[0]) is codec.Packed
        else:
            assert type(ops[0][2]) is dict and type(ops[0][2]["k00000"]) is dict
        root = apply_all(fixture, 0, [(code, tuple(path), argument) for code, path, argument in ops])
        arena = fixture.arena
        assert arena.current is not None
        written.append((root, bytes(arena.current.buf[: arena.used])))
        assert fixture.read(root) == {"users": records}
    assert written[0] == written[1]


def test_a_large_map_applied_twice_builds_the_same_tree_and_leaves_its_op_as_it_was(make):
    # A commit is replayed onto a compaction's copy with the ops it was applied with: the tree a
    # SortedEntries stands for is built afresh each time, and building it changes nothing in the op.
    records = {f"k{i:05d}": {"n": i} for i in range(3 * MAX_ENTRIES * MAX_ENTRIES)}
    encoded = codec.encode([[OP_SET, ["users"], records], [OP_SET, ["users", "k00007"], {"n": -7}]])
    first, second = make(), make()
    ops = writer_module.decode_ops(encoded, first.writer.records)
    assert type(ops[0][2]) is codec.SortedEntries
    as_applied = [(code, tuple(path), argument) for code, path, argument in ops]
    roots = [apply_all(fixture, 0, as_applied) for fixture in (first, second)]
    assert ops == writer_module.decode_ops(encoded, first.writer.records)
    written = [bytes(fixture.arena.current.buf[: fixture.arena.used]) for fixture in (first, second)]
    assert roots[0] == roots[1] and written[0] == written[1]
    assert first.read(roots[0]) == {"users": {**records, "k00007": {"n": -7}}}


# -- end to end: real coordinator, real persistence process ----------------------------------


def bulk_records(count: int, seed: int) -> dict[str, dict[str, Any]]:
    rng = random.Random(seed)
    return {
        f"user{i:06d}": {"city": rng.choice(["Paris", "Lyon", "Nice", "Oslo"]), "score": rng.randint(0, 99), "id": i}
        for i in range(count)
    }


def test_a_bulk_load_with_indexes_reads_back_and_passes_check(datadir):
    from protobase import F

    records = bulk_records(20_000, 1)
    with open_test_db(datadir) as db:
        with db.transaction() as tx:
            tx.root["users"] = records
            tx.root["users"].create_index("city")
            tx.root["users"].create_index("score")
        db.check()
        with db.snapshot() as snap:
            users = snap.root["users"]
            assert len(users) == len(records) and users["user012345"] == records["user012345"]
            hits = sorted(users.where((F.city == "Oslo") & (F.score > 90)).keys())
            assert hits == sorted(k for k, r in records.items() if r["city"] == "Oslo" and r["score"] > 90)


def test_a_commit_of_more_than_a_large_body_goes_out_in_pieces_and_commits_whole(datadir):
    records = bulk_records(60_000, 2)
    assert len(codec.encode(list(records.items()))) > LARGE_BODY  # its frame is sent and received as a large one
    with open_test_db(datadir) as db:
        with db.transaction() as tx:
            tx.root["users"] = records
        with db.transaction() as tx:  # the stream is still in step: the next frame is read from its first byte
            tx.root["after"] = 1
        with db.snapshot() as snap:
            assert dict(snap.root["users"].items()) == records and snap.root["after"] == 1


def test_a_record_of_many_fields_set_into_an_indexed_collection_is_indexed_and_reads_back(datadir):
    # A record of more than 256 text fields in order reaches the writer as two lists (SortedEntries),
    # inside an indexed collection: its index entries are those of the dict it stands for.
    from protobase import F

    wide = {f"a{i:03d}": i for i in range(300)} | {"city": "Oslo"}  # keys in order: "a299" < "city"
    with open_test_db(datadir) as db:
        with db.transaction() as tx:
            tx.root["users"] = {"a": {"city": "Nice"}}
            tx.root["users"].create_index("city")
        with db.transaction() as tx:
            tx.root["users"]["wide"] = wide
        db.check()
        with db.snapshot() as snap:
            users = snap.root["users"]
            assert users["wide"] == wide and sorted(users.where(F.city == "Oslo").keys()) == ["wide"]


def test_a_bulk_merge_into_an_indexed_collection_equals_small_commits(tmp_path):
    from protobase import F

    first, second = bulk_records(6_000, 2), bulk_records(9_000, 3)  # second overwrites the 6,000 and adds
    results = []
    for name, batch in (("bulk", len(second)), ("small", 50)):
        path = str(tmp_path / name)
        with open_test_db(path) as db:
            with db.transaction() as tx:
                tx.root["users"] = {}
                tx.root["users"].create_index("city")
                tx.root["users"].create_index("city", "score")
            for source in (first, second):
                items = list(source.items())
                for start in range(0, len(items), batch):
                    with db.transaction() as tx:
                        tx.root["users"].update(items[start : start + batch])
            db.check()
            with db.snapshot() as snap:
                users = snap.root["users"]
                results.append(
                    (
                        {key: dict(value) for key, value in users.items()},
                        sorted(users.where(F.city == "Nice").keys()),
                        sorted(users.where((F.city == "Lyon") & (F.score >= 50)).keys()),
                    )
                )
        assert wait_for_coordinator_exit(path)
    assert results[0] == results[1]
    assert results[0][0] == second


def _bulk_commit_forever(path: str, acknowledged: Any) -> None:
    """Commit bulk merges one after another, recording each acknowledged one (until killed)."""
    db = open_test_db(path, durability="sync")
    round_ = 0
    while True:
        round_ += 1
        with db.transaction() as tx:
            tx.root["users"].update({f"r{round_}-{i}": {"round": round_, "city": "X"} for i in range(5_000)})
        acknowledged.value = round_


def test_a_coordinator_killed_during_bulk_commits_loses_no_acknowledged_one(datadir, spawn_process):
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    acknowledged = context.Value("i", 0)
    with open_test_db(datadir) as db:
        with db.transaction() as tx:
            tx.root["users"] = {}
            tx.root["users"].create_index("round")
        writer = spawn_process(_bulk_commit_forever, datadir, acknowledged, context=context)
        # At least two acknowledged, the next one on its way when the coordinator dies.
        wait_until(lambda: acknowledged.value >= 2 or not writer.is_alive(), "two bulk commits")
        assert writer.is_alive(), "the bulk writer failed"
        psutil.Process(db.coordinator_pid).send_signal(signal.SIGKILL)
        writer.join(30)
        if writer.is_alive():
            writer.kill()
            writer.join(30)
        floor = acknowledged.value
        db.close()
    assert wait_for_coordinator_exit(datadir)
    with open_test_db(datadir) as db:  # recovery replays the WAL through the bulk path
        db.check()
        with db.snapshot() as snap:
            users = snap.root["users"]
            rounds = {record["round"] for record in users.values()}
            assert set(range(1, floor + 1)) <= rounds, f"acknowledged rounds 1..{floor}, found {sorted(rounds)}"
            assert rounds == set(range(1, max(rounds) + 1)), "a commit was applied in part"
            assert len(users) == 5_000 * len(rounds), "a commit was applied in part"


# -- the client: TxDict.update, the bulk write -----------------------------------------------


def test_update_records_what_assigning_each_key_records(db):
    records = {f"u{i}": {"n": i, "tags": ["a"]} for i in range(300)}
    with db.transaction() as tx:
        tx.root["a"] = {}
        tx.root["b"] = {}
    with db.transaction() as tx:
        tx.root["a"].update(records, extra=1)
        tx.root["a"].update([("u1", {"n": -1})])
        for key, value in {**records, "extra": 1, "u1": {"n": -1}}.items():
            tx.root["b"][key] = value
        assert dict(tx.root["a"].items()) == dict(tx.root["b"].items())
    with db.snapshot() as snap:
        assert len(snap.root["a"]) == 301 and snap.root["a"] == snap.root["b"]


def test_update_commits_what_it_was_given_then_and_keeps_the_order_of_writes(db):
    from protobase import F

    records = {f"u{i}": {"n": i, "city": "X"} for i in range(2_000)}
    with db.transaction() as tx:
        tx.root["users"] = {}
    with db.transaction() as tx:
        users = tx.root["users"]
        users["u0"] = {"n": -1, "city": "Y"}  # set before: the update overrides it
        users.update(records)
        users["u1"] = {"n": -2, "city": "Y"}  # set after: it overrides the update
        records["late"] = {"n": 0, "city": "X"}  # changing the dict given changes nothing of the commit
        del records["u2"]
        assert sorted(users.where(F.city == "Y").keys()) == ["u1"]  # queries in the transaction see it
        assert len(users.where(F.city == "X").keys()) == 1_999
    with db.snapshot() as snap:
        users = snap.root["users"]
        assert len(users) == 2_000 and "late" not in users and users["u2"] == {"n": 2, "city": "X"}
        assert users["u0"] == {"n": 0, "city": "X"} and users["u1"] == {"n": -2, "city": "Y"}


def test_update_with_a_value_that_cannot_be_stored_names_it_and_records_nothing(db):
    from protobase import EncodingError

    with db.transaction() as tx:
        tx.root["users"] = {}
    with db.transaction() as tx:
        with pytest.raises(EncodingError, match=r"users.*'bad'"):
            tx.root["users"].update({"good": 1, "bad": object()})
        assert "good" not in tx.root["users"]
        tx.root["users"]["other"] = 2
    with db.snapshot() as snap:
        assert dict(snap.root["users"]) == {"other": 2}
