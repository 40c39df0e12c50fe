"""Stateful test: one database driven by random transactions against a plain Python model.

A Hypothesis `RuleBasedStateMachine` keeps a plain `dict` as the model of the
root. Each rule draws operations (set or delete a top-level key, set or delete
a key inside a nested dict, append / insert / pop on lists, add / discard on
sets), applies them to `tx.root` inside a transaction and to the model, and
every step checks that a fresh snapshot thaws to exactly the model. Values
are sometimes large (dicts over 64 keys, sets over 64 elements, lists over
256 items), so both the one-atom and the tree representations, and the
switch between them, are exercised. Aborted transactions leave the model
unchanged; `db.compact()` must change nothing visible; `db.check()` runs
periodically and at the end of every run.

An operation is a tuple applied by the same `apply_op` to the transaction's
root and to the model: both answer the dict / list / set protocol, which is
the promise under test. On a failure Hypothesis prints the steps and a
`@reproduce_failure` blob (print_blob=True).
"""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from tests.conftest import open_test_db, remove_test_directory

TOP_KEYS = [f"k{i}" for i in range(6)]
CHECK_EVERY = 5  # steps between two db.check() calls

# -- value strategies ---------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),  # beyond 64 bits: the BIGINT extension
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.binary(max_size=12),
    st.integers(min_value=513, max_value=700).map(lambda n: "s" * n),  # long: an atom of its own
)
dict_keys = st.one_of(
    st.text(max_size=6),
    st.integers(min_value=-50, max_value=50),
    st.tuples(st.integers(min_value=0, max_value=3), st.text(max_size=2)),
)
set_elements = st.one_of(st.integers(min_value=-200, max_value=200), st.text(max_size=4))


def _big_dict(size: int, salt: int) -> dict:
    return {f"key{i}": ({"n": i, "l": [salt, i]} if i % 9 == 0 else i * salt) for i in range(size)}


def _big_list(size: int, salt: int) -> list:
    return [{"i": i, "s": {salt}} if i % 50 == 0 else (i + salt if i % 3 else f"v{i}") for i in range(size)]


def _big_set(size: int, salt: int) -> set:
    return {salt + i if i % 4 else f"e{i}" for i in range(size)}


big_values = st.one_of(
    st.builds(_big_dict, st.integers(min_value=65, max_value=100), st.integers(min_value=0, max_value=1000)),
    st.builds(_big_list, st.integers(min_value=257, max_value=330), st.integers(min_value=0, max_value=1000)),
    st.builds(_big_set, st.integers(min_value=65, max_value=100), st.integers(min_value=0, max_value=1000)),
)

small_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.dictionaries(dict_keys, children, max_size=5),
        st.lists(children, max_size=5),
        st.sets(set_elements, max_size=5),
        st.lists(children, max_size=3).map(tuple),
    ),
    max_leaves=12,
)

values = st.one_of(
    small_values, small_values, small_values, big_values, st.dictionaries(dict_keys, small_values, max_size=4)
)

# -- operations ---------------------------------------------------------------------------------


def containers(model: dict) -> list[tuple[tuple, Any]]:
    """Every (path, container) reachable from the root through dicts and lists (not tuples or sets)."""
    found: list[tuple[tuple, Any]] = []

    def walk(path: tuple, value: Any) -> None:
        if isinstance(value, dict):
            found.append((path, value))
            for key, item in value.items():
                walk(path + (key,), item)
        elif isinstance(value, list):
            found.append((path, value))
            for index, item in enumerate(value):
                walk(path + (index,), item)
        elif isinstance(value, set):
            found.append((path, value))

    for key, value in model.items():
        walk((key,), value)
    return found


def draw_op(data: st.DataObject, model: dict) -> tuple:
    """Draw one operation applicable to `model`."""
    reachable = containers(model)
    dicts = [path for path, value in reachable if isinstance(value, dict)]
    lists = [path for path, value in reachable if isinstance(value, list)]
    sets = [path for path, value in reachable if isinstance(value, set)]
    kinds = ["set_top", "set_top"]
    if model:
        kinds.append("del_top")
    if dicts:
        kinds += ["set_in", "set_in", "del_in"]
    if lists:
        kinds += ["append", "insert", "pop"]
    if sets:
        kinds += ["add", "discard"]
    kind = data.draw(st.sampled_from(kinds), label="operation")
    if kind == "set_top":
        return ("set_top", (), data.draw(st.sampled_from(TOP_KEYS)), data.draw(values))
    if kind == "del_top":
        return ("del_top", (), data.draw(st.sampled_from(sorted(model))))
    if kind in ("set_in", "del_in"):
        path = data.draw(st.sampled_from(dicts), label="path")
        existing = list(lookup(model, path))
        if kind == "del_in" and existing:
            return ("del_in", path, data.draw(st.sampled_from(existing), label="key"))
        key = data.draw(st.sampled_from(existing) | dict_keys if existing else dict_keys, label="key")
        return ("set_in", path, key, data.draw(values))
    if kind in ("append", "insert", "pop"):
        path = data.draw(st.sampled_from(lists), label="path")
        length = len(lookup(model, path))
        if kind == "append":
            return ("append", path, data.draw(small_values))
        if kind == "insert":
            index = data.draw(st.integers(min_value=-length - 2, max_value=length + 2), label="index")
            return ("insert", path, index, data.draw(small_values))
        if length == 0:
            return ("append", path, data.draw(scalars))
        return ("pop", path, data.draw(st.none() | st.integers(min_value=-length, max_value=length - 1)))
    path = data.draw(st.sampled_from(sets), label="path")
    existing = sorted(lookup(model, path), key=repr)
    element = data.draw(st.sampled_from(existing) | set_elements if existing else set_elements, label="element")
    return (kind, path, element)


def lookup(root: Any, path: tuple) -> Any:
    for key in path:
        root = root[key]
    return root


def apply_op(root: Any, op: tuple) -> None:
    """Apply `op` to `root`: the model's dict or a transaction's TxDict, through the same protocol."""
    kind, path, *args = op
    if kind in ("set_top", "set_in", "append", "insert"):
        args[-1] = copy.deepcopy(args[-1])  # never share a value between the model and a transaction
    target = lookup(root, path)
    if kind in ("set_top", "set_in"):
        target[args[0]] = args[1]
    elif kind in ("del_top", "del_in"):
        del target[args[0]]
    elif kind == "append":
        target.append(args[0])
    elif kind == "insert":
        target.insert(args[0], args[1])
    elif kind == "pop":
        popped = target.pop() if args[0] is None else target.pop(args[0])
        return popped
    elif kind == "add":
        target.add(args[0])
    elif kind == "discard":
        target.discard(args[0])
    else:
        raise AssertionError(f"unknown operation {kind}")


class Abort(Exception):
    """Raised inside a transaction to abort it."""


class DatabaseMachine(RuleBasedStateMachine):
    """One database, a plain dict model, and random transactions applied to both."""

    session_dir: str = ""  # set by the test before running the machine

    def __init__(self) -> None:
        super().__init__()
        self.parent = tempfile.mkdtemp(prefix="stateful", dir=self.session_dir or None)
        self.path = os.path.join(self.parent, "db")
        self.db = open_test_db(self.path, compact_min_bytes=1 << 20)
        self.model: dict = {}
        self.steps = 0

    def _commit_ops(self, data: st.DataObject, count: int) -> None:
        scratch = copy.deepcopy(self.model)
        ops: list[tuple] = []
        for _ in range(count):
            op = draw_op(data, scratch)
            ops.append(op)
            apply_op(scratch, op)
        with self.db.transaction() as tx:
            for op in ops:
                apply_op(tx.root, op)
        self.model = scratch

    @rule(data=st.data())
    def one_write(self, data: st.DataObject) -> None:
        self._commit_ops(data, 1)

    @rule(data=st.data(), count=st.integers(min_value=2, max_value=5))
    def several_writes(self, data: st.DataObject, count: int) -> None:
        self._commit_ops(data, count)

    @rule(key=st.sampled_from(TOP_KEYS), value=big_values)
    def set_big(self, key: str, value: Any) -> None:
        with self.db.transaction() as tx:
            tx.root[key] = copy.deepcopy(value)
        self.model[key] = value

    @rule(data=st.data(), count=st.integers(min_value=1, max_value=3))
    def aborted(self, data: st.DataObject, count: int) -> None:
        scratch = copy.deepcopy(self.model)
        with pytest.raises(Abort):
            with self.db.transaction() as tx:
                for _ in range(count):
                    op = draw_op(data, scratch)
                    apply_op(scratch, op)
                    apply_op(tx.root, op)
                raise Abort
        assert not tx.active

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def delete_top(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        with self.db.transaction() as tx:
            del tx.root[key]
        del self.model[key]

    @rule()
    def compact(self) -> None:
        self.db.compact()

    @invariant()
    def snapshot_equals_model(self) -> None:
        with self.db.snapshot() as snap:
            assert snap.root.thaw() == self.model

    @invariant()
    def structure_checks(self) -> None:
        self.steps += 1
        if self.steps % CHECK_EVERY == 0:
            self.db.check()

    def teardown(self) -> None:
        try:
            self.db.check()
        finally:
            self.db.close()
            problems = remove_test_directory(self.parent)
        assert not problems, "; ".join(problems)


def test_database_against_model(session_dir):
    DatabaseMachine.session_dir = session_dir
    run_state_machine_as_test(
        DatabaseMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            print_blob=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )


def test_nested_write_after_insert_in_tree_list(db):
    """Regression: a write inside an element of a tree list, after an insert shifted it, hit another element."""
    with db.transaction() as tx:
        tx.root["l"] = [{"i": i} for i in range(300)]  # > 256 items: a tree list
    with db.transaction() as tx:
        items = tx.root["l"]
        items.insert(0, {"i": "new"})
        items[10]["i"] = "changed"  # the element that was at index 9
    with db.snapshot() as snap:
        assert [snap.root["l"][j]["i"] for j in range(8, 12)] == [7, 8, "changed", 10]


@pytest.mark.parametrize("outer_size", [2, 300], ids=["small-list", "tree-list"])
@pytest.mark.parametrize("inner", ["list", "set"])
def test_tree_inside_a_list_element(db, outer_size, inner):
    """Regression: a large list or set inside an element of a list was read-only in a transaction."""
    big = list(range(300)) if inner == "list" else set(range(100))
    with db.transaction() as tx:
        tx.root["l"] = [{"i": i} for i in range(outer_size)]
        tx.root["l"][0]["big"] = big
    with db.transaction() as tx:
        target = tx.root["l"][0]["big"]
        if inner == "list":
            target.append("new")
        else:
            target.add("new")
    with db.snapshot() as snap:
        assert "new" in snap.root["l"][0]["big"]
