"""The GC policy (protobase/collector.py), and commit paths that leave no cyclic garbage behind.

The policy itself runs in a fresh interpreter (a subprocess), as in the
coordinator, so that it never changes the collector of the test process:
what survives start-up is frozen, the unfrozen old generation stays small
while the frozen heap grows, and cycles made after start-up (an exception
kept in a local) are still collected. The pause recorder is tested here
with a fake clock and with a forced collection.

The commit paths: `Commits` and `Writer` on the harness of test_commits.py
(the coordinator's side) and a real database (the client's side) run many
commits of every kind with `gc.DEBUG_SAVEALL`, which keeps whatever the
collector found unreachable in `gc.garbage`: it must stay empty. A cycle per
commit was what made the coordinator's collector run, and it must not come
back: in the client a conflict kept its traceback (and so its frames) in
the transaction, and every tracked copy and its owner held each other.
"""

from __future__ import annotations

import collections
import gc
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from protobase import ConflictError, DatabaseClosedError
from protobase.collector import POLICY_ENV, THRESHOLDS, Collector, PauseRecorder
from protobase.wire.opcodes import (
    LIST_APPEND,
    LIST_DELETE,
    LIST_SET,
    OP_CREATE_INDEX,
    OP_DELETE,
    OP_LIST,
    OP_SET,
    OP_SET_ADD,
    OP_SET_DISCARD,
)
from tests.test_commits import Harness

ROUNDS = 30  # commits of each kind per test

# -- the pause recorder ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_recorder_counts_pauses_and_keeps_the_longest():
    clock = Clock()
    recorder = PauseRecorder(clock)
    for pause in (0.002, 0.010, 0.001):
        recorder("start", {"generation": 0})
        clock.now += pause
        recorder("stop", {"generation": 0, "collected": 0, "uncollectable": 0})
        clock.now += 1.0  # between collections: not a pause
    assert recorder.pauses == 3
    assert recorder.longest_ms == pytest.approx(10.0)
    assert recorder.total_ms == pytest.approx(13.0)


def test_the_recorder_ignores_a_stop_it_saw_no_start_of():
    recorder = PauseRecorder(Clock())
    recorder("stop", {"generation": 2, "collected": 0, "uncollectable": 0})  # installed mid-collection
    assert (recorder.pauses, recorder.longest_ms) == (0, 0.0)


def test_the_recorder_times_a_forced_collection():
    recorder = PauseRecorder()
    recorder.install()
    recorder.install()  # idempotent: still one hook
    try:
        assert gc.callbacks.count(recorder) == 1
        gc.collect()
        assert recorder.pauses >= 1 and recorder.longest_ms > 0
        assert recorder.total_ms >= recorder.longest_ms
    finally:
        recorder.uninstall()
    assert recorder not in gc.callbacks


def test_with_the_policy_off_install_changes_nothing_but_records():
    collector = Collector({POLICY_ENV: "default"})
    thresholds, frozen = gc.get_threshold(), gc.get_freeze_count()
    collector.install()
    try:
        assert gc.get_threshold() == thresholds and gc.get_freeze_count() == frozen and collector.freezes == 0
        assert collector.recorder in gc.callbacks and collector not in gc.callbacks
        gc.collect()
        assert collector.recorder.pauses >= 1
    finally:
        collector.uninstall()
    assert collector.recorder not in gc.callbacks


# -- the policy, in a fresh interpreter -------------------------------------------------------

POLICY_SCRIPT = """
import gc, sys, weakref
from protobase.collector import Collector, THRESHOLDS

collector = Collector({})
started = [list(range(3)) for _ in range(50_000)]  # the start-up state
collector.install()
assert gc.get_freeze_count() >= 50_000, gc.get_freeze_count()
assert gc.get_threshold() == THRESHOLDS

class Node:
    pass

def failing():
    raise ValueError("a failure kept in a local: the traceback holds the frame that holds it")

def cycle_of_an_exception():
    try:
        failing()
    except ValueError as error:
        kept = error  # error -> traceback -> this frame -> kept -> error
    node = Node()
    kept.node = node
    return weakref.ref(node)

bound = 2 * THRESHOLDS[0] * (THRESHOLDS[1] + 1)  # what the young ones may promote (with a margin)
heap, dead, largest_old = [], [], 0
for step in range(200):
    heap.extend({"k": [i]} for i in range(1_000))  # the long-lived heap grows
    dead.append(cycle_of_an_exception())
    largest_old = max(largest_old, len(gc.get_objects(generation=1)) + len(gc.get_objects(generation=2)))
frozen = gc.get_freeze_count()
assert collector.freezes > 10, collector.freezes
assert frozen > 300_000, frozen  # the heap went to the permanent generation...
assert largest_old < bound, (largest_old, bound)  # ...and the old generation never held much of it
alive = sum(ref() is not None for ref in dead[:-5])  # (the last few may wait for the next collection)
# A collection that runs while a cycle is being built (inside cycle_of_an_exception) finds it
# reachable and freezes it: the policy's known gap, one cycle at most per such collection, which
# happened once in 195 on Python 3.10. Freezing them all would leave ~195.
assert alive <= 3, f"{alive} exception cycles made after start-up were never collected"
assert collector.audit() < 100  # what stayed frozen unreachable: cycles alive when frozen, none since
print("ok", collector.freezes, frozen, largest_old)
"""


def test_the_policy_freezes_the_heap_and_still_collects_later_cycles():
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    env.pop(POLICY_ENV, None)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(POLICY_SCRIPT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")


def test_thresholds_keep_every_collection_small():
    threshold0, threshold1, _ = THRESHOLDS
    assert threshold0 * (threshold1 + 1) <= 10_000  # what a collection of generation 1 (or 2) visits at most


# -- no cyclic garbage per commit ---------------------------------------------------------------


@contextmanager
def saved_garbage() -> Iterator[list[Any]]:
    """Collect, keep whatever the collector finds unreachable from here on in the list yielded (filled at exit)."""
    found: list[Any] = []
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield found
        gc.collect()
        found.extend(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def kinds(garbage: list[Any]) -> list[tuple[str, int]]:
    return collections.Counter(type(thing).__qualname__ for thing in garbage).most_common(8)


def coordinator_round(harness: Harness, n: int) -> None:
    """One commit of each kind the coordinator applies, refuses or waits on."""
    record = {"id": n, "city": f"c{n % 3}", "tags": ["a", n]}
    assert harness.commit("a", [OP_SET, ["users", f"u{n}"], record])[0] == "ok"
    assert harness.commit("a", [OP_DELETE, ["users", f"u{n - 1}"], None])[0] == "ok"
    assert harness.commit("a", [OP_LIST, ["log"], [[LIST_APPEND, 0, n], [LIST_SET, 0, n], [LIST_DELETE, 1, None]]])
    assert harness.commit("a", [OP_SET_ADD, ["seen"], [n, -n]], [OP_SET_DISCARD, ["seen"], [-n]])[0] == "ok"
    assert harness.commit("a", [OP_SET, ["users", "u0"], n], base=1)[0] == "conflict"
    assert harness.commit("a", [OP_SET, ["missing", "inner"], n])[0] == "error"  # a PathError answered
    reply = harness.commit("a", [OP_SET, ["n"], n], reads=[["users", "u1"]], serializable=True)
    assert reply[0] == "ok"
    assert harness.commit("a", [OP_SET, ["users", "u2"], record], durability="sync") is None
    harness.durability.durable_lsn = harness.durability.next_lsn - 1
    harness.commits.answer_durable()
    harness.connections.sent.clear()
    harness.durability.enqueued.clear()
    harness.control.published.clear()


@pytest.fixture
def loaded_harness() -> Iterator[Harness]:
    made = Harness()
    try:
        users = {f"u{i}": {"id": i, "city": f"c{i % 3}"} for i in range(200)}  # a tree
        made.commit("a", [OP_SET, ["users"], users], [OP_SET, ["log"], list(range(300))], [OP_SET, ["seen"], set()])
        made.commit("a", [OP_CREATE_INDEX, ["users"], "city"])
        coordinator_round(made, 0)  # caches and memos filled once
        yield made
    finally:
        made.close()


def test_the_coordinators_commits_leave_no_cyclic_garbage(loaded_harness):
    with saved_garbage() as garbage:
        for n in range(1, ROUNDS + 1):
            coordinator_round(loaded_harness, n)
    assert garbage == [], f"{ROUNDS} rounds of commits left cycles: {kinds(garbage)}"


def client_round(db: Any, n: int) -> None:
    """One transaction of each kind a client runs: every wrapper, a conflict retried, a refusal, an abort."""
    with db.transaction() as tx:
        tx.root["users"][f"new{n}"] = {"id": n, "tags": ["a"]}
        tx.root["users"]["u1"]["tags"].append(n)  # a tracked copy of a small list, and its owner
        tx.root["users"]["u1"]["roles"].add(n)  # of a small set
        tx.root["log"].append(n)  # a tree list: element ops
        tx.root["log"][0]["seen"] = n  # a tracked element of a tree list
        tx.root["big"].add(n)  # a tree set
        _ = tx.root["users"]["u2"]["tags"][0]  # only read: its tracked copy is handed out all the same
    lost: list[bool] = []
    for attempt in db.attempts(retries=3):  # a conflict, then a retry that commits
        with attempt as tx:
            tx.root["users"]["u3"] = n
            if not lost:
                lost.append(True)
                with db.transaction() as other:
                    other.root["users"]["u3"] = -n
    assert len(lost) == 1
    loser = db.transaction()
    loser.root["users"]["u4"] = n
    with db.transaction() as winner:
        winner.root["users"]["u4"] = -n
    with pytest.raises(ConflictError):
        loser.commit()
    with pytest.raises(ConflictError):
        loser.outcome()  # the refusal, raised again
    with pytest.raises(ValueError), db.transaction() as tx:
        tx.root["users"]["u5"] = n
        raise ValueError("the body failed: aborted")
    with db.transaction(isolation="serializable", durability="async") as tx:
        tx.root["users"]["u6"] = tx.root["users"]["u7"]["id"] + n


@pytest.fixture
def loaded_db(db):
    with db.transaction() as tx:
        tx.root["users"] = {f"u{i}": {"id": i, "tags": ["x"], "roles": {"r"}} for i in range(100)}
        tx.root["log"] = [{"i": i} for i in range(300)]
        tx.root["big"] = set(range(100))
    client_round(db, 0)
    return db


def test_the_clients_commits_leave_no_cyclic_garbage(loaded_db):
    with saved_garbage() as garbage:
        for n in range(1, ROUNDS + 1):
            client_round(loaded_db, n)
    assert garbage == [], f"{ROUNDS} rounds of transactions left cycles: {kinds(garbage)}"


def test_wrappers_refuse_use_once_their_transaction_released_them(db):
    with db.transaction() as tx:
        tx.root["l"] = [1, 2]
        tx.root["log"] = [{"i": i} for i in range(300)]
    with db.transaction() as tx:
        small = tx.root["l"]
        small.append(3)
        element = tx.root["log"][0]
    message = r"^this transaction is committed; start a new one with db.transaction\(\)$"
    for change in (lambda: small.append(4), lambda: element.__setitem__("i", 9)):
        with pytest.raises(DatabaseClosedError, match=message):
            change()
    assert repr(tx) == f"<Transaction committed base_seq={tx.base_seq} writes=1>"  # its ops still counted
    with db.snapshot() as snap:
        assert snap.root["l"] == [1, 2, 3] and snap.root["log"][0] == {"i": 0}
