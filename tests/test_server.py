"""The coordinator (coordinator/server.py) under conditions a client cannot cause politely.

- a compaction that finds /dev/shm full is undone: the commit that triggered it
  gets one reply, "ok"; checkpoints and backups name the segments the root
  lives in; every acknowledged commit survives a restart;
- requests from the socket are data: a commit holding an internal reference,
  or based on a snapshot that does not exist yet, is refused and changes
  nothing;
- out of file descriptors, the coordinator refuses connections and keeps
  serving; the reader table is sized with `protobase serve --reader-slots`.

Raw requests go through `request`, the one place that knows the request
layout of wire/verbs.py. Coordinators are real processes: started by
`protobase.open` (the /dev/shm fault comes through the environment they
inherit, shm/segment.py) or by `protobase serve`; limits are lowered on the
coordinator process itself with prlimit.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import msgpack
import psutil
import pytest

import protobase
from protobase.client import launcher
from protobase.collector import POLICY_ENV
from protobase.coordinator.server import Coordinator
from protobase.core import codec
from protobase.core.arena import FIRST_SEGMENT, VALUE, segment_of
from protobase.core.codec import Ref
from protobase.core.datadir import FORMAT_VERSION, DataDir
from protobase.errors import CoordinatorError, PathError, ProtoBaseError, ProtocolError
from protobase.persistence.checkpoint import read_checkpoint
from protobase.settings import DEFAULTS, Settings
from protobase.shm import DEFAULT_READER_SLOTS, HEADER_SIZE, SLOT_SIZE
from protobase.shm import ring as commit_ring
from protobase.shm.segment import FAULTS_ENV
from protobase.wire import framing
from protobase.wire.counters import COUNTER_NAMES, OldestReaderCounters
from protobase.wire.error_table import error_from_reply
from protobase.wire.opcodes import OP_SET
from tests.conftest import GRACE, open_test_db, served, wait_for_coordinator_exit

DEADLINE = 60.0  # seconds any one wait may take before the test fails
COMPACT_MIN = 1 << 20


def receive(sock: socket.socket) -> list:
    """The next message from the coordinator, without its request id (blocking)."""
    return receive_message(sock)[1:]


def receive_message(sock: socket.socket) -> list:
    """The next message from the coordinator: [request id, *reply] (blocking)."""
    (length,) = framing.LENGTH.unpack(_exactly(sock, framing.LENGTH.size))
    return codec.decode(_exactly(sock, length), frozen=False)


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the coordinator closed the connection")
        data += chunk
    return data


def request(sock: socket.socket, verb: str, *fields: object) -> list:
    """Send one request as wire/verbs.py lays it out and return the reply's fields."""
    framing.send(sock, [1, verb, *fields])
    return receive(sock)


@contextmanager
def connection(db: protobase.Database) -> Iterator[socket.socket]:
    """A raw connection to the coordinator of `db`, closed afterwards."""
    sock = launcher.try_connect(db.datadir)
    assert sock is not None, "no coordinator listens"
    sock.settimeout(DEADLINE)
    try:
        yield sock
    finally:
        sock.close()


# -- a compaction on a full /dev/shm ---------------------------------------------------------------

# What the coordinator reserves before its data: the control segment and the commit ring.
FIXED_SEGMENTS = HEADER_SIZE + DEFAULT_READER_SLOTS * SLOT_SIZE + commit_ring.DATA_OFFSET + commit_ring.DEFAULT_CAPACITY


def commit_numbered(db: protobase.Database, number: int) -> None:
    """Commit `number` under its own key, and garbage: a 20 kB blob every commit replaces."""
    with db.transaction() as tx:
        tx.root[f"c{number}"] = number
        tx.root["blob"] = f"{number}:" + "x" * 20_000


def assert_holds(db: protobase.Database, numbers: list[int]) -> None:
    with db.snapshot() as snap:
        assert [snap.root.get(f"c{number}") for number in numbers] == numbers
        assert snap.root["blob"].startswith(f"{numbers[-1]}:")
    db.check()


def test_a_compaction_on_full_shm_is_undone_and_its_commit_answered_ok_once(datadir, monkeypatch):
    # Room for two 1 MiB data segments: the compaction that the second one's garbage
    # triggers cannot get a segment for its copy.
    monkeypatch.setenv(FAULTS_ENV, f"enospc_after={FIXED_SEGMENTS + 2 * FIRST_SEGMENT}")
    backup = os.path.join(os.path.dirname(datadir), "backup")
    acknowledged: list[int] = []
    with open_test_db(datadir, compact_min_bytes=COMPACT_MIN) as db:
        while db.stats().compaction_failures == 0:
            assert len(acknowledged) < 200, "no compaction was tried"
            commit_numbered(db, len(acknowledged))  # the one that triggers it returns normally
            acknowledged.append(len(acknowledged))
        for _ in range(3):  # replies stay in step, and commits go on in the old generation
            commit_numbered(db, len(acknowledged))
            acknowledged.append(len(acknowledged))
        with pytest.raises(
            ProtoBaseError,
            match=r"compaction failed and was undone, the database is unchanged: "
            r"shared memory \(/dev/shm\) is full",
        ):
            db.compact()
        stats = db.stats()
        assert (stats.compactions, stats.compaction_failures) == (0, 2)
        assert_holds(db, acknowledged)

        checkpoint = read_checkpoint(db.backup(backup))  # what the checkpoint code lists as the generation
        assert segment_of(checkpoint.root) in {index for index, _, _ in checkpoint.segments}
    monkeypatch.delenv(FAULTS_ENV)
    assert wait_for_coordinator_exit(datadir)

    for path in (datadir, backup):
        with open_test_db(path) as db:
            assert_holds(db, acknowledged)
        assert wait_for_coordinator_exit(path)


# -- requests are data -----------------------------------------------------------------------------


def ops_holding(value: object) -> bytes:
    return codec.encode([[OP_SET, ["evil"], value]])


def ops_with_a_reference_as_ext8(ptr: int) -> bytes:
    # The same Ref as ext 8 (length, type, payload) instead of fixext 8: msgpack decodes both.
    word = struct.pack("<Q", VALUE << 60 | ptr)
    return b"\x91\x93" + msgpack.packb(OP_SET) + msgpack.packb(["evil"]) + b"\xc7\x08" + bytes([codec.EXT_REF]) + word


def opaque_dataclass(fields: dict) -> msgpack.ExtType:
    return msgpack.ExtType(codec.EXT_DATACLASS, codec.encode(["tests.Point", fields]))


REFUSED_REFERENCE = r"commit refused, nothing was applied: .*internal reference types cannot be stored"
BAD_REQUESTS = {  # name -> (ops bytes made from a pointer to a live atom, error class, message)
    "a reference as the value": (lambda ptr: ops_holding(Ref(ptr, VALUE)), "EncodingError", REFUSED_REFERENCE),
    "a reference deep inside": (
        lambda ptr: ops_holding({"a": [(1, Ref(ptr, VALUE))]}),
        "EncodingError",
        REFUSED_REFERENCE,
    ),
    "a reference as a key": (lambda ptr: ops_holding({Ref(ptr, VALUE): 1}), "EncodingError", REFUSED_REFERENCE),
    "a reference in a set": (lambda ptr: ops_holding({Ref(ptr, VALUE)}), "EncodingError", REFUSED_REFERENCE),
    "a reference in a dataclass": (
        lambda ptr: ops_holding(opaque_dataclass({"x": (Ref(ptr, VALUE),)})),
        "EncodingError",
        REFUSED_REFERENCE,
    ),
    "a reference in a nested dataclass": (
        lambda ptr: ops_holding([opaque_dataclass({"inner": opaque_dataclass({"x": Ref(ptr, VALUE)})})]),
        "EncodingError",
        REFUSED_REFERENCE,
    ),
    "a reference encoded as ext 8": (ops_with_a_reference_as_ext8, "EncodingError", REFUSED_REFERENCE),
    "a malformed dataclass": (
        lambda ptr: ops_holding(msgpack.ExtType(codec.EXT_DATACLASS, b"\xc1")),
        "EncodingError",
        r"commit refused, nothing was applied: a dataclass value in it is "
        r"malformed",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_commit_holding_an_internal_reference_is_refused_and_changes_nothing(db, case):
    make_ops, error_class, message = BAD_REQUESTS[case]
    with db.transaction() as tx:
        tx.root["users"] = {f"u{i}": {"name": "x" * 600, "n": i} for i in range(100)}
    with db.snapshot() as snap:
        seq, target = snap.seq, snap.root["users"].ptr
    with connection(db) as sock:
        reply = request(sock, "commit", seq, False, "sync", make_ops(target), [])
        assert reply[:2] == ["error", error_class], reply
        assert re.search(message, reply[2]), reply[2]
        assert request(sock, "stats")[1]["seq"] == seq  # in step, and nothing was committed
    with db.snapshot() as snap:
        assert "evil" not in snap.root
    db.check()
    db.compact()
    db.check()
    with db.transaction() as tx:
        tx.root["after"] = 1
    with db.snapshot() as snap:
        assert snap.root["after"] == 1 and len(snap.root["users"]) == 100


def test_a_commit_based_on_a_future_snapshot_is_refused(db):
    with db.transaction() as tx:
        tx.root["k"] = 1
    seq = db.stats().seq
    with connection(db) as sock:
        reply = request(sock, "commit", seq + 5, False, "sync", ops_holding(2), [])
        assert reply == [
            "error",
            "ProtoBaseError",
            f"commit refused, nothing was applied: it is based on snapshot seq {seq + 5}, but the "
            f"latest commit is seq {seq}; a transaction is based on the seq of the snapshot it read",
        ]
    assert db.stats().seq == seq
    with db.snapshot() as snap:
        assert "evil" not in snap.root


def test_a_commit_on_a_missing_container_arrives_as_a_path_error_and_changes_nothing(db):
    with db.transaction() as tx:
        tx.root["k"] = 1
    seq = db.stats().seq
    ops = codec.encode([[OP_SET, ["no such key", "inner"], 2]])
    with connection(db) as sock:
        reply = request(sock, "commit", seq, False, "sync", ops, [])
    missing = "commit refused: no container at ('no such key', 'inner'): the key is missing"
    assert reply == ["error", "PathError", missing]
    received = error_from_reply(reply)
    assert type(received) is PathError and isinstance(received, protobase.ProtoBaseError)
    assert db.stats().seq == seq


def test_commits_read_in_one_pass_are_applied_as_one_group_and_answered_in_order(db):
    with db.transaction() as tx:
        tx.root["k"] = 0
    before = db.stats()
    seq = before.seq
    commits = [
        [request_id, "commit", seq, False, "async", ops, []]
        for request_id, ops in [
            (1, codec.encode([[OP_SET, ["a"], 1]])),
            (2, codec.encode([[OP_SET, ["a"], 2]])),  # the same snapshot and key as 1: it conflicts with 1
            (3, codec.encode([[OP_SET, ["b"], 3]])),
            (4, codec.encode([[OP_SET, ["missing", "c"], 4]])),  # refused: nothing else changes
        ]
    ]
    stats = [5, "stats"]  # served after the commits before it
    with connection(db) as sock:
        sock.sendall(b"".join(framing.encode_frame(message) for message in [*commits, stats]))  # one pass
        replies = [receive_message(sock) for _ in range(5)]
    assert [reply[0] for reply in replies] == [1, 2, 3, 4, 5]  # in the order asked
    assert replies[0][1:3] == ["ok", seq + 1] and replies[2][1:3] == ["ok", seq + 2]
    assert replies[1][1:] == ["conflict", ["a"], seq, seq + 1] and replies[3][1:3] == ["error", "PathError"]
    counters = replies[4][2]
    assert (counters["seq"], counters["published_seq"]) == (seq + 2, seq + 2)
    assert counters["commits"] - before.commits == 2 and counters["commit_groups"] - before.commit_groups == 1
    with db.snapshot() as snap:
        assert (snap.root["a"], snap.root["b"], "missing" in snap.root) == (1, 3, False)
    db.check()


def test_the_stats_reply_holds_exactly_the_counters_of_the_schema(db):
    with db.transaction() as tx:
        tx.root["k"] = 1
    with db.snapshot(), connection(db) as sock:  # a pinned snapshot: oldest_reader is filled in
        reply = request(sock, "stats")
    assert reply[0] == "ok"
    assert list(reply[1]) == list(COUNTER_NAMES)
    assert set(reply[1]["oldest_reader"]) == set(OldestReaderCounters.__annotations__)


def test_the_coordinator_freezes_its_start_up_heap_and_reports_its_collector(db):
    # The policy runs in the coordinator (protobase/collector.py), never in this client.
    thresholds = gc.get_threshold()
    for n in range(50):
        with db.transaction() as tx:
            tx.root[f"k{n}"] = {"n": n, "tags": [n]}
    stats = db.stats()
    assert stats.gc_freezes >= 1  # the heap it started with, at least
    assert stats.gc_pauses >= 0 and 0 <= stats.gc_longest_pause_ms <= stats.gc_pause_total_ms
    assert gc.get_threshold() == thresholds and db.coordinator_pid != os.getpid()


def test_a_coordinator_started_with_protobase_gc_default_keeps_cpythons_collector(datadir, monkeypatch):
    monkeypatch.setenv(POLICY_ENV, "default")  # the coordinator the open starts inherits it
    with open_test_db(datadir) as db:
        with db.transaction() as tx:
            tx.root["k"] = 1
        stats = db.stats()
    assert stats.gc_freezes == 0 and stats.gc_pauses >= 0


# -- file descriptors and reader slots ---------------------------------------------------------------


def lowest_free_descriptor(pid: int) -> int:
    """The descriptor number process `pid` would get next: with RLIMIT_NOFILE there, every one below is in use."""
    in_use = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return min(set(range(len(in_use) + 1)) - in_use)


@contextmanager
def descriptor_limit(pid: int, limit: int) -> Iterator[Callable[[], None]]:
    """Lower process `pid`'s soft RLIMIT_NOFILE to `limit` (it caps descriptor numbers, not their count).

    Yields the function that restores the limit, which leaving the block calls too.
    """
    process = psutil.Process(pid)
    soft, hard = process.rlimit(psutil.RLIMIT_NOFILE)
    process.rlimit(psutil.RLIMIT_NOFILE, (limit, hard))

    def restore() -> None:
        process.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))

    try:
        yield restore
    finally:
        restore()


def commit_for(db: protobase.Database, seconds: float) -> int:
    """Commit small transactions for `seconds` (several housekeeping passes); return how many."""
    until = time.monotonic() + seconds
    count = 0
    while time.monotonic() < until:
        with db.transaction() as tx:
            tx.root["n"] = count
        count += 1
    return count


def test_out_of_file_descriptors_a_connection_is_refused_and_the_coordinator_keeps_serving(db):
    with db.transaction() as tx:
        tx.root["n"] = -1
    pid = db.coordinator_pid
    with descriptor_limit(pid, lowest_free_descriptor(pid)):  # every descriptor it may have is in use
        for _ in range(3):
            with connection(db) as sock:
                reply = receive(sock)  # unasked: the coordinator answers, then hangs up
            assert reply[:2] == ["error", "CoordinatorError"], reply
            assert re.search(
                r"\(pid \d+\) is out of file descriptors \(Too many open files\) and refused this "
                r"connection; close idle database handles, or raise its limit",
                reply[2],
            ), reply[2]
        count = commit_for(db, 1.0)
    with db.snapshot() as snap:
        assert snap.root["n"] == count - 1
    with open_test_db(db.path) as other:
        with other.transaction() as tx:
            tx.root["other"] = True
    with db.snapshot() as snap:
        assert snap.root["other"] is True


def test_a_handle_opened_while_the_coordinator_is_out_of_descriptors_gets_its_refusal_at_once(db):
    pid = db.coordinator_pid
    with descriptor_limit(pid, lowest_free_descriptor(pid)):
        started = time.monotonic()
        with pytest.raises(CoordinatorError, match=r"is out of file descriptors .* and refused this connection"):
            open_test_db(db.path)
        # Not retried as if the coordinator were stopping (that waits up to launcher.START_TIMEOUT, 600 s);
        # the refusal itself took 10.3 s once on a loaded machine, hence the margin.
        assert time.monotonic() - started < 60
    with db.transaction() as tx:
        tx.root["still"] = "served"


def test_out_of_file_descriptors_even_without_the_spare_a_connection_waits_and_is_served(db):
    with db.transaction() as tx:
        tx.root["n"] = -1
    # Below every descriptor but stdin, stdout and stderr: even its spare descriptor is over the limit.
    with descriptor_limit(db.coordinator_pid, 3) as restore, connection(db) as sock:
        framing.send(sock, [1, "hello", FORMAT_VERSION])
        count = commit_for(db, 1.0)  # the listener waits; the clients it has are served
        restore()
        reply = receive(sock)  # accepted once descriptors are free again
        assert reply[0] == "ok", reply
    with db.snapshot() as snap:
        assert snap.root["n"] == count - 1


def test_serve_with_more_or_fewer_reader_slots(datadir):
    with served(datadir, "--reader-slots", "2", "--log-level", "WARNING") as server:
        with (
            protobase.open(datadir, start_coordinator=False) as first,
            protobase.open(datadir, start_coordinator=False) as second,
        ):
            assert first.coordinator_pid == second.coordinator_pid == server.pid
            with pytest.raises(
                ProtoBaseError,
                match=r"reader table full \(2 slots\): every slot is held by an "
                r"open database handle .*close idle handles, or start the "
                r"coordinator with more slots: protobase serve DIR "
                r"--reader-slots N, or protobase.open\(DIR, reader_slots=N\)",
            ):
                protobase.open(datadir, start_coordinator=False)
        with protobase.open(datadir, start_coordinator=False):  # their slots are free again
            pass
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=DEADLINE) == 0


# -- settings ---------------------------------------------------------------------------------------


def test_the_coordinator_takes_its_settings(datadir):
    directory = DataDir.open(datadir)
    chosen = Settings(flush_interval=0.05, tick=0.5)
    assert Coordinator(directory, chosen).settings == chosen
    assert Coordinator(directory).settings == DEFAULTS


def test_a_settings_flag_reaches_the_running_coordinator(datadir):
    # The launcher passes settings as flags of `python -m protobase.coordinator`; this one bounds what
    # the coordinator holds of incomplete requests, so a request half-sent past it closes the connection.
    sock = launcher.connect(DataDir.open(datadir), grace=GRACE, max_buffered_bytes=4096)
    sock.settimeout(DEADLINE)
    try:
        sock.sendall(framing.LENGTH.pack(10_000) + b"\x00" * 5_000)
        error = error_from_reply(receive(sock))
        assert isinstance(error, ProtocolError)
        assert str(error) == (
            "the coordinator holds 5004 bytes of incomplete requests, over its 4096-byte "
            "bound; send smaller commits (split the transaction)"
        )
        assert sock.recv(1) == b""  # and it hung up
    finally:
        sock.close()
