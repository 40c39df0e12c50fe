"""The worker pool: one snapshot per call, in order, errors and dead workers reported."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import psutil
import pytest

from protobase.client.pool import RemoteTraceback, chunk_sizes
from protobase.errors import WorkerDiedError
from tests.conftest import open_test_db


def seq_and_total(snapshot, item):
    """What a worker sees: its snapshot's seq and the counter, plus the item."""
    return snapshot.seq, snapshot.root["counter"], item


def score_of(snapshot, key):
    return key, snapshot.root["users"][key]["score"]


def fail_on_three(snapshot, item):
    if item == 3:
        raise ValueError(f"item {item} is bad")
    return item


def die_on_three(snapshot, item):
    if item == 3:
        os._exit(7)
    return item


def pid_of_worker(snapshot, item):
    return os.getpid()


@pytest.fixture
def pooled(datadir):
    db = open_test_db(datadir, durability="async")
    with db.transaction() as tx:
        tx.root["counter"] = 0
        tx.root["users"] = {f"u{i:04}": {"score": i} for i in range(1000)}
    pool = db.pool(processes=2)
    yield db, pool
    pool.close()
    db.close()


def test_every_item_of_a_call_reads_the_same_snapshot_while_others_commit(pooled):
    db, pool = pooled
    results = pool.imap(seq_and_total, range(40), chunksize=2)
    first = next(results)
    for value in range(1, 6):  # commits land while the call is running
        with db.transaction() as tx:
            tx.root["counter"] = value
    rest = list(results)
    assert [item for _, _, item in [first, *rest]] == list(range(40))  # in order
    assert {(seq, total) for seq, total, _ in [first, *rest]} == {(first[0], 0)}
    assert pool.map(seq_and_total, [0])[0][1] == 5  # the next call sees the new state


def test_map_keys_reads_the_keys_in_the_workers(pooled):
    _, pool = pooled
    results = pool.map_keys(score_of, "users", chunksize=64)
    assert results == [(f"u{i:04}", i) for i in range(1000)]


def test_an_exception_reaches_the_caller_with_the_worker_traceback(pooled):
    _, pool = pooled
    with pytest.raises(ValueError, match="item 3 is bad") as raised:
        pool.map(fail_on_three, range(8), chunksize=1)
    assert isinstance(raised.value.__cause__, RemoteTraceback)
    assert "fail_on_three" in str(raised.value.__cause__)
    assert pool.map(fail_on_three, [1, 2]) == [1, 2]  # the pool is still usable


def test_a_dead_worker_is_reported_and_replaced(pooled):
    _, pool = pooled
    before = {worker.process.pid for worker in pool._workers}
    with pytest.raises(WorkerDiedError, match="died \\(exit code 7\\)"):
        pool.map(die_on_three, range(8), chunksize=1)
    after = {worker.process.pid for worker in pool._workers}
    assert pool.replaced == 1 and pool.processes == 2
    assert len(before - after) == 1 and len(after - before) == 1
    assert pool.map(die_on_three, [1, 2]) == [1, 2]  # the replacement works


def test_a_few_items_spread_over_every_worker(pooled):
    # Regression (issue 10, item 18): chunks of 64 put any call of fewer items on one worker.
    _, pool = pooled
    assert len(set(pool.map(pid_of_worker, range(4)))) == 2
    assert len(set(pool.map(pid_of_worker, iter(range(4))))) == 2  # a count not known in advance too


def test_chunk_sizes_follow_the_item_count_and_the_workers():
    assert next(chunk_sizes(8, 4)) == 1
    assert next(chunk_sizes(1000, 4)) == 63  # about four tasks per worker
    assert next(chunk_sizes(10**9, 2)) == 10_000  # bounded
    assert list(itertools.islice(chunk_sizes(None, 4), 8)) == [1, 2, 4, 8, 16, 32, 64, 64]


UNGUARDED_SCRIPT = """
import sys
import protobase

def double(snapshot, item):
    return 2 * item

db = protobase.open(sys.argv[1], create=False)
with db.pool(processes=2) as pool:  # no `if __name__ == "__main__":` guard
    print(pool.map(double, range(4)))
db.close()
"""


def test_a_pool_opened_by_an_unguarded_script_fails_with_a_clear_error(datadir, tmp_path):
    with open_test_db(datadir) as db:
        script = tmp_path / "unguarded.py"
        script.write_text(UNGUARDED_SCRIPT)
        result = subprocess.run(
            [sys.executable, str(script), datadir],
            capture_output=True,
            text=True,
            timeout=180,
            env=dict(os.environ, PYTHONPATH=os.getcwd()),
        )
        assert result.returncode != 0
        assert "did not start" in result.stderr and 'under `if __name__ == "__main__":`' in result.stderr
        assert "db.pool() was called while this process was starting as a pool worker" in result.stderr
        db.check()


def test_a_pool_keeps_working_after_the_coordinator_restarts(pooled):
    # Regression (issue 10, item 19): handles held across a restart failed for good.
    db, pool = pooled
    assert pool.map(seq_and_total, [1]) == [(db.stats().seq, 0, 1)]
    coordinator = psutil.Process(db.coordinator_pid)
    coordinator.kill()
    coordinator.wait(30)
    with db.transaction() as tx:  # reattaches, starting a new coordinator (async: the last commits may be gone)
        tx.root["counter"] = 7
    assert [total for _, total, _ in pool.map(seq_and_total, range(6))] == [7] * 6
