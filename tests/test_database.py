"""The Database handle: retried transactions, and a handle that outlives its coordinator."""

from __future__ import annotations

import asyncio
import os
import re
import signal

import psutil
import pytest

import protobase
from protobase.errors import CoordinatorRestartedError
from tests.conftest import open_test_db


def kill_coordinator(db: protobase.Database) -> None:
    """SIGKILL the coordinator this test's open() started, and wait until it is gone."""
    process = psutil.Process(db.coordinator_pid)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def test_transactional_refuses_an_async_function_at_decoration(db):
    # Regression (issue 10, item 17): it committed an empty transaction and returned a coroutine.
    async def add(tx, item):
        tx.root["items"] = [item]

    with pytest.raises(TypeError, match=r"@db.transactional cannot run .*add: it is asynchronous, so its body"):
        db.transactional()(add)


def test_transactional_without_parentheses_runs_the_function_in_a_retried_transaction(db):
    runs = []

    @db.transactional
    def add(tx, item, *, times=1):
        """Add an item."""
        runs.append(tx.base_seq)
        tx.root["items"] = tx.root.get("items", ()) + (item,) * times
        return len(tx.root["items"])

    assert add("x", times=2) == 2
    assert (add.__name__, add.__doc__) == ("add", "Add an item.")
    with db.snapshot() as snap:
        assert snap.root["items"] == ("x", "x")
    assert len(runs) == 1


def test_transactional_without_parentheses_refuses_an_async_function(db):
    async def add(tx, item):
        tx.root["items"] = [item]

    with pytest.raises(TypeError, match=r"@db.transactional cannot run .*add: it is asynchronous"):
        db.transactional(add)


def test_transactional_takes_its_retries_positionally_as_before(db):
    @db.transactional(0)
    def doomed(tx):
        tx.root["x"] = 1
        with db.transaction() as other:  # a concurrent write to the same key
            other.root["x"] = 2

    with pytest.raises(protobase.ConflictError):
        doomed()


def test_transactional_refuses_a_function_that_returns_an_awaitable(db):
    async def add(tx, item):
        tx.root["items"] = [item]

    add_later = db.transactional()(lambda tx, item: add(tx, item))
    with pytest.raises(TypeError, match="it is asynchronous"):
        add_later("x")
    with db.snapshot() as snap:
        assert "items" not in snap.root
    assert db.stats().commits == 0


def test_transactional_works_from_an_event_loop_through_an_executor(db):
    @db.transactional()
    def add(tx, item):
        tx.root["items"] = tx.root.get("items", ()) + (item,)

    async def main():
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, add, n) for n in range(4)))

    asyncio.run(main())
    with db.snapshot() as snap:
        assert sorted(snap.root["items"]) == [0, 1, 2, 3]


def test_a_transaction_open_across_a_coordinator_restart_is_run_again(datadir):
    runs = []
    with open_test_db(datadir) as db:
        with db.transaction() as tx:
            tx.root["counter"] = 0

        @db.transactional(retries=3)
        def increment(tx):
            runs.append(tx.base_seq)
            tx.root["counter"] += 1
            if len(runs) == 1:
                kill_coordinator(db)  # the first run commits into a restarted coordinator

        increment()
        assert len(runs) == 2
        with db.snapshot() as snap:
            assert snap.root["counter"] == 1


def test_a_retryable_error_is_raised_once_the_retries_are_spent(datadir):
    with open_test_db(datadir) as db:

        @db.transactional(retries=0)
        def doomed(tx):
            tx.root["k"] = 1
            kill_coordinator(db)

        with pytest.raises(CoordinatorRestartedError, match="restarted while this transaction was open"):
            doomed()
        with db.snapshot() as snap:
            assert "k" not in snap.root


def test_reader_slots_bounds_the_handles_attached_at_once(datadir):
    # Regression (issue 10, item 12): the reader-table-full error advised "more reader slots",
    # which no option of protobase.open set.
    with open_test_db(datadir, reader_slots=2) as first, open_test_db(datadir):
        with pytest.raises(protobase.ProtoBaseError, match=r"reader table full \(2 slots\)"):
            open_test_db(datadir)
        with first.transaction() as tx:
            tx.root["ok"] = True


def test_reader_slots_must_be_a_positive_count(datadir):
    with pytest.raises(ValueError, match="reader_slots must be a whole number from 1 to"):
        protobase.open(datadir, reader_slots=0)


@pytest.mark.parametrize("busy_poll", [0, 0.001])
def test_busy_poll_configures_the_handle_and_the_coordinator_it_starts(datadir, busy_poll):
    with open_test_db(datadir, busy_poll=busy_poll, durability="sync") as db:
        for i in range(20):
            with db.transaction() as tx:
                tx.root[i] = i
        assert db.stats().commits == 20
        with db.snapshot() as snap:
            assert dict(snap.root) == {i: i for i in range(20)}
        # The coordinator took it from its command line and handed it on to its persistence process.
        (persistence,) = [
            child
            for child in psutil.Process(db.coordinator_pid).children()
            if "protobase.persistence" in child.cmdline()
        ]
        assert f"--busy-poll {float(busy_poll)}" in " ".join(persistence.cmdline())


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (
            "flush_interval",
            -1,
            "flush_interval must be a number of seconds >= 0, got -1; pass e.g. flush_interval=0.01",
        ),
        ("checkpoint_bytes", 1.5, "checkpoint_bytes must be a whole number of bytes >= 0, got 1.5;"),
        ("compact_min_bytes", -5, "compact_min_bytes must be a whole number of bytes >= 0, got -5;"),
        ("shutdown_grace", -1, "shutdown_grace must be a number of seconds >= 0"),
        ("busy_poll", 2, "busy_poll must be a number of seconds from 0 to 1, got 2; pass e.g. busy_poll=0.0005"),
    ],
)
def test_a_bad_coordinator_setting_is_refused_by_open_before_anything_starts(datadir, option, value, message):
    # Regression: these reached the coordinator's command line, whose usage text came back in a CoordinatorError.
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        protobase.open(datadir, **{option: value})
    assert not os.path.exists(os.path.join(datadir, "coordinator.sock"))
