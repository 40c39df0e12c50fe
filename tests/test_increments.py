"""Conflict-free increments: `incr` (client/txvalues.py, local.py), OP_INCR (coordinator/writer.py, commits.py).

An increment is applied by the coordinator to the latest value at commit and
is not validated against the snapshot, so concurrent increments of one key
never conflict; it still counts as a write, so a read-modify-write of the key
conflicts with it. Reading the key in the transaction gives the snapshot's
value plus its own increments. Amounts are 64-bit ints or finite floats, on
the client and, since the socket is untrusted, on the coordinator, which
answers a malformed one with an error and stays up. Increments are replayed
from the WAL by recovery, and work in indexed collections (the index follows).
The suite runs on the compiled and the pure-Python core alike.
"""

from __future__ import annotations

import math

import psutil
import pytest

import protobase
from protobase import F
from protobase.core import codec
from protobase.errors import ConflictError, PathError, ProtoBaseError
from protobase.wire.opcodes import OP_INCR
from tests.conftest import in_forked_child, open_test_db
from tests.test_server import connection, request


def read(db, *path):
    with db.snapshot() as snap:
        value = snap.root
        for key in path:
            value = value[key]
        return protobase.thaw(value)


@pytest.fixture
def stats(db):
    with db.transaction() as tx:
        tx.root["stats"] = {"adds": 10, "ratio": 0.5, "name": "shop"}
    return db


# -- what a transaction sees and commits ---------------------------------------------------------


def test_incr_adds_to_a_number_and_counts_a_missing_key_as_zero(stats):
    with stats.transaction() as tx:
        tx.root["stats"].incr("adds")
        tx.root["stats"].incr("views", 5)
        tx.root["stats"].incr("ratio", 0.25)
    assert read(stats, "stats") == {"adds": 11, "views": 5, "ratio": 0.75, "name": "shop"}


def test_a_forked_child_cannot_commit_the_transaction_it_inherited(stats):
    """Regression: the child's copy committed too, so the parent's increment counted twice."""
    tx = stats.transaction()
    tx.root["stats"].incr("adds")

    def body() -> bytes:
        try:
            tx.commit()
        except ProtoBaseError as error:
            return b"ok" if "a forked child of it, cannot commit it" in str(error) and tx.state == "aborted" else b"?"
        return b"committed"

    assert in_forked_child(body) == b"ok"
    tx.commit()
    assert read(stats, "stats")["adds"] == 11


def test_a_transaction_reads_its_snapshot_plus_its_own_increments(stats):
    with stats.transaction() as tx:
        counters = tx.root["stats"]
        counters.incr("adds", 2)
        counters.incr("adds", 3)
        counters.incr("fresh")
        assert counters["adds"] == 15 and counters["fresh"] == 1
        assert "fresh" in counters and len(counters) == 4
        assert dict(counters) == {"adds": 15, "ratio": 0.5, "name": "shop", "fresh": 1}
    assert read(stats, "stats", "adds") == 15


def test_incr_after_an_assignment_or_a_deletion_adds_to_the_transactions_own_value(stats):
    with stats.transaction() as tx:
        tx.root["stats"]["adds"] = 100
        tx.root["stats"].incr("adds")
        del tx.root["stats"]["ratio"]
        tx.root["stats"].incr("ratio", 2)
    assert read(stats, "stats") == {"adds": 101, "ratio": 2, "name": "shop"}


def test_incr_on_a_dict_assigned_in_the_transaction(db):
    with db.transaction() as tx:
        tx.root["fresh"] = {"n": 1}
        tx.root["fresh"].incr("n", 4)
        tx.root["fresh"].incr("m")
    assert read(db, "fresh") == {"n": 5, "m": 1}


@pytest.mark.parametrize("amount", [True, "1", None, 2**63, -(2**63), math.nan, math.inf, [1]])
def test_incr_refuses_an_amount_that_is_not_a_64_bit_int_or_a_finite_float(stats, amount):
    with stats.transaction() as tx:
        with pytest.raises(TypeError, match="^incr\\(\\) adds an int of 64 bits or a finite float, got "):
            tx.root["stats"].incr("adds", amount)
    assert read(stats, "stats", "adds") == 10


def test_the_increments_of_one_key_in_a_transaction_are_one_amount_and_bounded_as_one(stats):
    with stats.transaction() as tx:
        tx.root["stats"].incr("adds", 2**62)
        with pytest.raises(TypeError, match="adds an int of 64 bits"):
            tx.root["stats"].incr("adds", 2**62)  # the sum would not fit the one op that carries it
        tx.root["stats"].incr("adds", -1)
    assert read(stats, "stats", "adds") == 10 + 2**62 - 1


def test_incr_of_something_else_than_a_number_is_refused_where_the_transaction_sees_it(stats):
    tx = stats.transaction()
    with pytest.raises(TypeError, match=r"^incr\(\) adds to a number, but \('stats', 'name'\) holds a str$"):
        tx.root["stats"].incr("name")
    tx.root["stats"]["adds"] = "many"
    with pytest.raises(TypeError, match="holds a str"):
        tx.root["stats"].incr("adds")
    tx.abort()


def test_a_commit_is_refused_when_the_latest_value_is_no_longer_a_number(stats):
    tx = stats.transaction()
    tx.root["stats"].incr("adds")
    tx.root["other"] = 1
    with stats.transaction() as other:
        other.root["stats"]["adds"] = "many"
    with pytest.raises(
        PathError, match=r"^commit refused: cannot increment str at key 'adds': incr\(\) adds to a number"
    ):
        tx.commit()
    assert read(stats, "stats", "adds") == "many" and "other" not in read(stats)


# -- conflicts -----------------------------------------------------------------------------------


def test_concurrent_increments_of_one_key_never_conflict(stats):
    transactions = [stats.transaction() for _ in range(5)]  # all on the same snapshot
    for number, tx in enumerate(transactions):
        tx.root["stats"].incr("adds", number)
    for tx in transactions:
        tx.commit()
    assert read(stats, "stats", "adds") == 10 + sum(range(5))
    assert stats.stats().conflicts == 0


def test_a_read_modify_write_conflicts_with_an_increment_committed_after_its_snapshot(stats):
    tx = stats.transaction()
    tx.root["stats"]["adds"] = tx.root["stats"]["adds"] + 1
    with stats.transaction() as other:
        other.root["stats"].incr("adds")
    with pytest.raises(ConflictError):
        tx.commit()
    assert read(stats, "stats", "adds") == 11


def test_a_serializable_transaction_that_read_the_key_validates_it(stats):
    tx = stats.transaction(isolation="serializable")
    seen = tx.root["stats"]["adds"]
    tx.root["stats"].incr("adds")
    tx.root["log"] = seen  # decided on what it read
    with stats.transaction() as other:
        other.root["stats"].incr("adds")
    with pytest.raises(ConflictError):
        tx.commit()
    assert read(stats, "stats", "adds") == 11
    blind = stats.transaction(isolation="serializable")
    blind.root.incr("hits")  # reads nothing (a root key: reaching root["stats"] would read that dict)
    with stats.transaction() as other:
        other.root.incr("hits")
    blind.commit()
    assert read(stats, "hits") == 2


def test_an_increment_inside_an_indexed_collection_keeps_its_index_in_step(db):
    with db.transaction() as tx:
        tx.root["players"] = {f"p{i}": {"score": i} for i in range(100)}
        tx.root["players"].create_index("score")
    with db.transaction() as tx:
        tx.root["players"]["p3"].incr("score", 1000)
    with db.snapshot() as snap:
        assert [r["score"] for r in snap.root["players"].where(F.score > 500)] == [1003]
        assert list(snap.root["players"].where(F.score == 3)) == []
    db.check()


# -- untrusted input, recovery -------------------------------------------------------------------


@pytest.mark.parametrize("amount", [True, "1", None, 2**63, 2**70, math.nan, -math.inf, [1], {"n": 1}])
def test_the_coordinator_answers_a_malformed_increment_with_an_error_and_serves_on(stats, amount):
    seq = stats.stats().seq
    ops = codec.encode([[OP_INCR, ["stats", "adds"], amount]])
    with connection(stats) as sock:
        reply = request(sock, "commit", seq, False, "sync", ops, [])
    assert reply[:2] == ["error", "ProtocolError"]
    assert "malformed request: " in reply[2]
    assert stats.stats().seq == seq
    with stats.transaction() as tx:
        tx.root["stats"].incr("adds")
    assert read(stats, "stats", "adds") == 11


def test_an_increment_of_a_container_is_refused_as_a_path_error(stats):
    seq = stats.stats().seq
    with connection(stats) as sock:
        reply = request(sock, "commit", seq, False, "sync", codec.encode([[OP_INCR, ["stats"], 1]]), [])
        assert reply == [
            "error",
            "PathError",
            "commit refused: cannot increment a container at key 'stats': incr() adds to a number (or a missing key)",
        ]
        reply = request(sock, "commit", seq, False, "sync", codec.encode([[OP_INCR, ["nowhere", "n"], 1]]), [])
        assert reply[:2] == ["error", "PathError"]
    assert stats.stats().seq == seq


def test_increments_are_replayed_from_the_wal_after_a_crash(datadir):
    db = open_test_db(datadir)
    with db.transaction() as tx:
        tx.root["stats"] = {"adds": 0}
    for number in range(50):
        with db.transaction() as tx:
            tx.root["stats"].incr("adds", number)
            tx.root["stats"].incr("half", 0.5)
    coordinator = psutil.Process(db.coordinator_pid)
    coordinator.kill()  # no final checkpoint: the new coordinator replays the WAL
    coordinator.wait(timeout=30)
    assert read(db, "stats") == {"adds": sum(range(50)), "half": 25.0}
    assert db.stats().seq == 51
    db.check()
    db.close()
