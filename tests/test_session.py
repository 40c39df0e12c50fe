"""client/session.py: a handle's attachment to its coordinator: pins in the reader slot, epochs, commits, reattach."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from protobase.client.session import Launch, Session
from protobase.client.snapshot import Snapshot
from protobase.client.transaction import Transaction
from protobase.core.datadir import DataDir
from protobase.errors import (
    ConflictError,
    CoordinatorError,
    CoordinatorRestartedError,
    DatabaseClosedError,
    EncodingError,
)
from protobase.shm import names
from protobase.wire.opcodes import OP_SET
from tests.conftest import GRACE, in_forked_child


@pytest.fixture
def session(datadir):
    opened = Session(DataDir.open(datadir), Launch(grace=GRACE))
    yield opened
    opened.close()


def commit(session: Session, key: str, value: object) -> int:
    """Commit root[key] = value through the session's commit interface; return the new seq."""
    base, _, epoch = session.pin()
    try:
        request = session.prepare_commit(epoch, base, False, None, [[OP_SET, [key], value]], [], lambda ops: None)
        session.send_commit(request)
        seq = session.await_commit(request)
        request.release()
    finally:
        session.unpin(base, epoch, os.getpid())
    assert seq is not None
    return seq


def held(session: Session) -> int | None:
    """The seq our reader slot holds, as the coordinator reads it."""
    return session.control.reader_snapshot(session.slot)


def test_the_reader_slot_holds_the_oldest_pin_until_the_last_is_released(session):
    first, _, epoch = session.pin()
    commit(session, "a", 1)
    second, _, _ = session.pin()
    assert second > first and held(session) == first
    session.unpin(first, epoch, os.getpid())
    assert held(session) == second
    session.unpin(second, epoch, os.getpid())
    assert held(session) is None


def test_two_pins_of_one_seq_are_released_one_by_one(session):
    seq, _, epoch = session.pin()
    again, _, _ = session.pin()
    assert again == seq
    session.unpin(seq, epoch, os.getpid())
    assert held(session) == seq
    session.unpin(seq, epoch, os.getpid())
    assert held(session) is None


def test_a_pin_of_another_epoch_is_not_released(session):
    seq, _, epoch = session.pin()
    session.unpin(seq, epoch - 1, os.getpid())
    assert held(session) == seq
    session.unpin(seq, epoch, os.getpid())


def test_a_commit_returns_its_seq_and_its_value_reads_back(session):
    seq = commit(session, "k", {"x": [1, 2]})
    pinned, root, epoch = session.pin()
    assert pinned == seq and root["k"] == {"x": [1, 2]}
    session.unpin(pinned, epoch, os.getpid())


def test_a_commit_on_a_stale_snapshot_of_a_written_key_conflicts(session):
    base, _, epoch = session.pin()
    commit(session, "k", 1)
    request = session.prepare_commit(epoch, base, False, None, [[OP_SET, ["k"], 2]], [], lambda ops: None)
    session.send_commit(request)
    with pytest.raises(ConflictError):
        session.await_commit(request)
    request.release()
    session.unpin(base, epoch, os.getpid())


def test_a_commit_without_durability_takes_the_session_s(session):
    session.durability = "async"
    ops = [[OP_SET, ["k"], 1]]
    assert session.prepare_commit(session.epoch, 0, False, None, ops, [], lambda ops: None).message[3] == "async"
    assert session.prepare_commit(session.epoch, 0, False, "sync", ops, [], lambda ops: None).message[3] == "sync"


def test_an_unencodable_commit_is_explained_by_the_check_it_is_given(session):
    seen = []

    def check(ops):
        seen.append(ops)
        raise EncodingError("at root['k']: the user's path")

    ops = [[OP_SET, ["k"], object()]]
    with pytest.raises(EncodingError, match="the user's path"):
        session.prepare_commit(session.epoch, 0, False, None, ops, [], check)
    assert seen == [ops]
    with pytest.raises(EncodingError):  # a check that finds nothing: the codec's own error
        session.prepare_commit(session.epoch, 0, False, None, ops, [], lambda ops: None)


def test_a_broken_connection_reattaches_to_the_same_instance_keeping_its_pins(session):
    seq, _, epoch = session.pin()
    instance, connection = session.instance_id, session.connection
    connection.close()  # broken, as an interrupted send leaves it
    session.ensure_attached()
    assert session.connection is not connection
    assert (session.instance_id, session.epoch) == (instance, epoch)
    assert held(session) == seq  # the pin moved to the new slot
    session.unpin(seq, epoch, os.getpid())
    assert held(session) is None


def test_a_restarted_coordinator_is_a_new_epoch_and_voids_the_old_pins(session):
    seq, _, epoch = session.pin()
    request = session.prepare_commit(epoch, seq, False, None, [[OP_SET, ["k"], 1]], [], lambda ops: None)
    old_instance = session.instance_id
    coordinator = psutil.Process(session.control.coordinator_pid)
    coordinator.send_signal(signal.SIGKILL)
    coordinator.wait(timeout=30)
    session.ensure_attached()  # starts a new coordinator
    assert session.instance_id != old_instance and session.epoch == epoch + 1
    with pytest.raises(CoordinatorRestartedError, match="restarted while this transaction was open"):
        session.send_commit(request)
    session.unpin(seq, epoch, os.getpid())  # a pin of the old instance: nothing to release
    assert held(session) is None


def test_a_snapshot_of_an_old_epoch_says_the_coordinator_restarted(session):
    snapshot = Snapshot(session, *session.pin())
    session.epoch += 1  # as a reattach to a new instance does
    with pytest.raises(CoordinatorRestartedError, match=f"snapshot {snapshot.seq} was taken before the coordinator"):
        _ = snapshot.root
    session.epoch -= 1
    assert snapshot.root is not None
    snapshot.close()
    assert held(session) is None


def test_adopting_an_older_pin_of_another_session_lowers_its_slot(datadir, session):
    older, root, epoch = session.pin()
    commit(session, "k", 1)
    worker = Session(DataDir.open(datadir), Launch(grace=GRACE))  # a pool worker's
    try:
        newer, _, worker_epoch = worker.pin()
        assert newer > older and held(worker) == newer
        seq, adopted, _ = worker.adopt(session.instance_id, older, root.ptr)
        assert seq == older and held(worker) == older
        assert "k" not in adopted  # it reads the older root, not the published one
        worker.unpin(older, worker_epoch, os.getpid())
        assert held(worker) == newer
        worker.unpin(newer, worker_epoch, os.getpid())
    finally:
        worker.close()
    session.unpin(older, epoch, os.getpid())


def test_adopt_refuses_a_pin_of_another_coordinator_instance(session):
    with pytest.raises(CoordinatorRestartedError, match="restarted during this pool call"):
        session.adopt(names.new_instance_id(), 1, 0)


def test_a_closed_session_says_so_and_closing_again_does_nothing(session):
    session.close()
    session.close()
    assert session.closed
    with pytest.raises(DatabaseClosedError, match=r"database .* is closed; open it again with protobase.open\(\)"):
        session.request(["stats"])
    with pytest.raises(DatabaseClosedError):
        session.pin()


def test_without_start_a_session_refuses_a_directory_nobody_serves(datadir):
    with pytest.raises(CoordinatorError, match="no coordinator serves"):
        Session(DataDir.open(datadir), Launch(start=False))


def test_a_forked_child_attaches_with_a_slot_of_its_own(session):
    seq, _, epoch = session.pin()

    def body() -> bytes:  # the child: its first use attaches anew
        child_seq, _, child_epoch = session.pin()
        mine = [reader for reader in session.control.readers() if reader.pid == os.getpid()]
        ok = child_seq >= seq and len(mine) == 1 and mine[0].snapshot_seq == child_seq
        session.unpin(child_seq, child_epoch, os.getpid())
        session.close()
        return b"ok" if ok else b"no"

    assert in_forked_child(body) == b"ok"
    assert held(session) == seq  # the child's pins and closing never touched ours
    session.unpin(seq, epoch, os.getpid())


def test_a_forked_child_closing_what_it_inherited_keeps_its_own_pin_of_the_same_seq(session):
    """Regression: an inherited snapshot (or transaction) closed in a forked child released the child's
    own pin of that seq, so the coordinator could reclaim what the child's snapshot still read."""
    inherited = Snapshot(session, *session.pin())
    transaction = Transaction(session)
    seq = inherited.seq

    def body() -> bytes:
        child_snapshot = Snapshot(session, *session.pin())  # attaches anew: a slot of the child's own
        if child_snapshot.seq != seq:
            return b"a commit came in between"
        inherited.close()
        transaction.abort()
        if held(session) != seq:
            return b"released"
        child_snapshot.close()
        return b"ok" if held(session) is None else b"kept"

    assert in_forked_child(body) == b"ok"
    assert held(session) == seq  # the parent's pins are its own
    transaction.abort()
    inherited.close()
    assert held(session) is None
