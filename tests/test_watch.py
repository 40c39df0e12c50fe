"""Change notification: watchers wake on the commits that touch their prefixes, and only those."""

from __future__ import annotations

import multiprocessing

import psutil

from tests.conftest import open_test_db


def commit_in_child(path: str, key: str, value: int) -> None:
    with open_test_db(path) as db:
        with db.transaction() as tx:
            tx.root[key] = value


def test_a_watcher_sees_matching_commits_from_other_processes(db):
    with db.transaction() as tx:
        tx.root["carts"] = {"u1": {"items": []}}
    with db.watch("carts") as watcher:
        assert watcher.wait(timeout=0.05) is None  # nothing yet: a timeout, not a hang
        with db.transaction() as tx:
            tx.root["carts"]["u1"]["items"].append("apple")
        change = watcher.wait(timeout=10)
        assert change is not None and change.seq == tx.seq
        assert change.paths == (("carts", "u1", "items"),)
        with db.snapshot() as snap:
            assert snap.seq >= change.seq and snap.root["carts"]["u1"]["items"] == ["apple"]
        context = multiprocessing.get_context("spawn")
        other = context.Process(target=commit_in_child, args=(db.path, "elsewhere", 1))
        other.start()
        other.join(30)
        assert other.exitcode == 0
        assert watcher.wait(timeout=0.3) is None  # a commit elsewhere does not wake us
        child = context.Process(target=commit_in_child, args=(db.path, "carts", 2))
        child.start()
        child.join(30)
        change = watcher.wait(timeout=10)
        assert change is not None and change.paths == (("carts",),)


def test_watching_everything_and_nested_prefixes(db):
    with db.watch() as everything, db.watch(("a", "x")) as nested:
        with db.transaction() as tx:
            tx.root["a"] = {"x": 1, "y": 2}
        with db.transaction() as tx:
            tx.root["a"]["y"] = 3
        first = everything.wait(timeout=10)
        second = everything.wait(timeout=10)
        assert (first.paths, second.paths) == ((("a",),), (("a", "y"),))
        assert nested.wait(timeout=10).paths == (("a",),)  # replacing root["a"] touches a/x
        assert nested.wait(timeout=0.3) is None  # a/y does not


def test_a_watcher_outlives_a_coordinator_restart(db):
    # Regression (issue 10, item 19): a watcher held across a restart failed for good.
    with db.transaction() as tx:
        tx.root["k"] = 0
    with db.watch("k") as watcher:
        coordinator = psutil.Process(db.coordinator_pid)
        coordinator.kill()
        coordinator.wait(30)
        with db.transaction() as tx:  # reattaches: starts the coordinator the watcher waits for
            tx.root["other"] = 1
        resubscribed = watcher.wait(timeout=60)
        assert resubscribed is not None and resubscribed.paths == ((),)  # re-read: changes may be missed
        with db.transaction() as tx:
            tx.root["k"] = 1
        change = watcher.wait(timeout=60)
        assert change is not None and change.paths == (("k",),) and change.seq == tx.seq
