"""The commit sequence (coordinator/commits.py): parse_ops, validation, publishing in order, a failed disk.

`Commits` runs here on a real Writer and arena (as test_writer.py), with the
coordinator's other parts replaced by recorders: the control block records
what is published, the durability what is enqueued and how far it is
durable, the connections what each asker and watcher is sent. So the order
of things is visible: a "sync" commit is published and answered only once
its LSN is durable, roots are published in seq order (a compaction's too),
and after a disk failure nothing more is acknowledged. (test_reclamation.py
runs compactions on the same harness.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from protobase.coordinator.clients import Asker
from protobase.coordinator.commits import Commits, GroupFailed, parse_ops, wal_record
from protobase.coordinator.durability import DurabilityFailed
from protobase.coordinator.writer import Writer
from protobase.core import codec
from protobase.core.arena import DICT_LEAF, ArenaWriter, AtomReader
from protobase.core.codec import Ref
from protobase.core.store import Store
from protobase.errors import EncodingError, ProtocolError
from protobase.shm import new_instance_id, sweep
from protobase.shm.control import ReaderSlot
from protobase.wire.opcodes import (
    LIST_APPEND,
    LIST_DELETE,
    LIST_INSERT,
    LIST_SET,
    OP_CREATE_INDEX,
    OP_DELETE,
    OP_LIST,
    OP_SET,
    OP_SET_ADD,
    OP_SET_DISCARD,
)

# -- parse_ops ------------------------------------------------------------------------------


def test_parse_ops_returns_the_ops_of_a_well_formed_commit():
    ops = [
        [OP_SET, ["a", 1], {"x": 1}],
        [OP_DELETE, ["b"], None],
        [OP_LIST, ["l"], [[LIST_APPEND, 0, 5]]],
        [OP_CREATE_INDEX, ["users"], ("city", "score")],
    ]
    assert parse_ops(codec.encode(ops)) == ops
    # With the writer's record limits the small plain record comes back as its bytes, nothing else changes.
    with_records = parse_ops(codec.encode(ops), RECORDS)
    assert with_records[0][2] == codec.Packed(codec.pack({"x": 1}))
    assert with_records[1:] == ops[1:]


@pytest.mark.parametrize("seq", [0, 127, 128, 1 << 40])
@pytest.mark.parametrize("size", [0, 255, 256, 65535, 65536])
def test_a_wal_record_given_as_parts_is_the_encoding_of_seq_and_ops(seq, size):
    ops_bytes = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert b"".join(wal_record(seq, ops_bytes)) == codec.encode([seq, ops_bytes])


RECORDS = codec.PlainRecords(entries=64, text=32, size=16 << 10)  # the writer's, with the default Settings


@pytest.mark.parametrize(
    "ops, error, message",
    [
        (b"\xc1", ProtocolError, "malformed request: the commit's ops cannot be decoded"),
        (codec.encode([]), ProtocolError, "malformed request: a commit's ops are a non-empty array"),
        (codec.encode({"a": 1}), ProtocolError, "malformed request: a commit's ops are a non-empty array"),
        (codec.encode([[OP_SET, "a", 1]]), ProtocolError, r"malformed request: an op is \[code, key path, argument\]"),
        (codec.encode([[OP_SET, ["a"]]]), ProtocolError, r"malformed request: an op is \[code, key path, argument\]"),
        (
            codec.encode([[99, ["a"], 1]]),
            ProtocolError,
            "malformed request: op code 99 with an argument of type int is not an operation",
        ),
        (
            codec.encode([[OP_DELETE, ["a"], 1]]),
            ProtocolError,
            f"malformed request: op code {OP_DELETE} with an argument of type int is not an operation",
        ),
        (
            codec.encode([[OP_LIST, ["l"], [[LIST_APPEND, 0]]]]),
            ProtocolError,
            r"malformed request: a list operation is \[code, index \(a 64-bit int; None to append\), value\]",
        ),
        (
            codec.encode([[OP_LIST, ["l"], [[LIST_SET, "x", 1]]]]),
            ProtocolError,
            r"malformed request: a list operation is \[code, index",
        ),
        (
            codec.encode([[OP_LIST, ["l"], [[LIST_INSERT, 10**30, 1]]]]),
            ProtocolError,
            r"malformed request: a list operation is \[code, index",
        ),
        (
            codec.encode([[OP_LIST, ["l"], [[LIST_SET, None, 1]]]]),
            ProtocolError,
            r"malformed request: a list operation",
        ),
        (codec.encode([[OP_SET, ["a", [1]], 1]]), EncodingError, "cannot use a key of type list at"),
        (codec.encode([[OP_SET_ADD, ["s"], [[1]]]]), EncodingError, r"cannot use a key of type list at root\['s'\]"),
        (codec.encode([[OP_SET_DISCARD, ["s"], [float("nan")]]]), EncodingError, "cannot use NaN as a key"),
        # A small dict where no dict belongs: named a dict though it is kept as its bytes (a Packed).
        (codec.encode([[OP_SET, ["a", {"k": 1}], 1]]), EncodingError, "cannot use a key of type dict at"),
        (codec.encode([[OP_SET_ADD, ["s"], [{"k": 1}]]]), EncodingError, "cannot use a key of type dict at"),
        (
            codec.encode([[OP_DELETE, ["a"], {"k": 1}]]),
            ProtocolError,
            f"malformed request: op code {OP_DELETE} with an argument of type dict is not an operation",
        ),
    ],
)
def test_parse_ops_refuses_what_no_client_of_ours_sends(ops, error, message):
    for records in (None, RECORDS):
        with pytest.raises(error, match=f"^{message}"):
            parse_ops(ops, records)


# -- the commit sequence ----------------------------------------------------------------------


class Control:
    """Records what is published; holds the reader table the test sets (`readers`)."""

    def __init__(self) -> None:
        self.published: list[tuple[int, int]] = []
        self.reader_slots: list[ReaderSlot] = []
        self.oldest_segment = 0

    def publish_root(self, seq: int, root: int) -> None:
        self.published.append((seq, root))

    def readers(self) -> list[ReaderSlot]:
        return list(self.reader_slots)

    def oldest_snapshot(self) -> int | None:
        return min((r.snapshot_seq for r in self.reader_slots if r.snapshot_seq is not None), default=None)


class Durability:
    """Records what is enqueued; `durable_lsn` moves only when the test says so."""

    def __init__(self) -> None:
        self.failure: str | None = None
        self.next_lsn = 1
        self.durable_lsn = 0
        self.enqueued: list[tuple[int, list[Any], bool]] = []

    def enqueue(self, payload: list[bytes], sync: bool) -> int:
        self.enqueued.append((self.next_lsn, codec.decode(b"".join(payload), frozen=False), sync))
        self.next_lsn += 1
        return self.next_lsn - 1


class Connections:
    """Records what each asker and watcher is sent, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, Any]] = []

    def answer(self, asker: Any, reply: Any) -> None:
        if asker is not None and reply is not None:
            self.sent.append((asker, reply))

    def notify(self, seq: int, paths: list[Any]) -> None:
        self.sent.append(("watchers", [seq, [list(path) for path in paths]]))


class Named:
    """A test's asker: a name that stands for its client too (Commits counts a client's losses by `asker.client`)."""

    def __init__(self, name: Any) -> None:
        self.name = name
        self.request_id = 0

    @property
    def client(self) -> Named:
        return self  # (a property: an attribute holding itself would be a reference cycle per commit)

    def __eq__(self, other: object) -> bool:
        return other == self.name if not isinstance(other, Named) else other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return repr(self.name)


def _named(asker: Any) -> Any:
    return asker if isinstance(asker, Named) or asker is None else Named(asker)


class Harness:
    def __init__(self) -> None:
        self.instance = new_instance_id()
        self.arena = ArenaWriter(self.instance)
        self.writer = Writer(self.arena, Store(AtomReader(self.instance, writer=self.arena)))
        self.control, self.durability, self.connections = Control(), Durability(), Connections()
        self.applied = 0
        self.commits = Commits(
            self.writer,
            self.control,
            self.durability,
            self.connections,  # type: ignore[arg-type]
            seq=0,
            root=0,
            directory="/srv/db",
            on_applied=self.on_applied,
        )

    def on_applied(self) -> None:
        self.applied += 1

    def commit(
        self,
        asker: Any,
        *ops: list[Any],
        base: int | None = None,
        durability: str = "async",
        reads: list[Any] | None = None,
        serializable: bool = False,
    ) -> Any:
        return self.commits.commit(
            _named(asker),
            self.commits.seq if base is None else base,
            serializable,
            durability,
            codec.encode(list(ops)),
            reads or [],
        )

    def group(self, *requests: tuple[Any, list[list[Any]]], base: int | None = None, durability: str = "async") -> Any:
        """Commit (asker, ops) requests as one group, all based on `base` (default: the latest seq)."""
        based = self.commits.seq if base is None else base
        return self.commits.commit_group(
            [(_named(asker), [based, False, durability, codec.encode(ops), []]) for asker, ops in requests]
        )

    def read(self, *path: Any) -> Any:
        """The value at `path` in the latest root, as a reader would decode it."""
        value: Any = self.writer.store.value(Ref(self.commits.root, DICT_LEAF))
        for key in path:
            value = value[key]
        return value

    def close(self) -> None:
        self.writer.store.reader.close()
        self.arena.close(unlink=True)
        assert sweep(self.instance) == []


@pytest.fixture
def harness() -> Iterator[Harness]:
    made = Harness()
    yield made
    made.close()


def test_an_async_commit_is_published_notified_and_answered_at_once(harness):
    reply = harness.commit("alice", [OP_SET, ["k"], {"v": 1}], [OP_SET, ["n"], 2])
    assert reply[:2] == ["ok", 1] and harness.commits.seq == harness.commits.published_seq == 1
    assert harness.control.published == [(1, harness.commits.root)]
    assert harness.connections.sent == [("watchers", [1, [["k"], ["n"]]])]
    assert harness.durability.enqueued[0][0] == 1 and harness.durability.enqueued[0][2] is False
    assert harness.durability.enqueued[0][1][0] == 1  # the WAL record: [seq, ops bytes]
    assert (harness.commits.commits, harness.applied) == (1, 1)


def test_a_sync_commit_is_published_and_answered_once_durable_and_in_order(harness):
    assert harness.commit("first", [OP_SET, ["a"], 1], durability="sync") is None
    assert harness.commit("second", [OP_SET, ["b"], 2], durability="sync") is None
    assert harness.control.published == [] and harness.commits.published_seq == 0
    harness.commits.answer_durable()  # nothing durable yet
    assert harness.connections.sent == []
    harness.durability.durable_lsn = 2  # one fsync covers both: group commit
    harness.commits.answer_durable()
    assert harness.control.published == [(2, harness.commits.root)]  # only the newest root
    assert [(who, reply[:2]) for who, reply in harness.connections.sent] == [
        ("watchers", [1, [["a"]]]),
        ("first", ["ok", 1]),
        ("watchers", [2, [["b"]]]),
        ("second", ["ok", 2]),
    ]


def test_an_async_commit_behind_a_waiting_sync_one_waits_for_it(harness):
    harness.commit("sync", [OP_SET, ["a"], 1], durability="sync")
    assert harness.commit("async", [OP_SET, ["b"], 2]) is None
    # Its root holds the sync commit's data, which a crash could still take back: not shown yet
    # (before: published at once, so a reader saw "a" before it was durable).
    assert harness.control.published == [] and harness.connections.sent == []
    harness.durability.durable_lsn = 1  # the sync record; the async one need not be durable
    harness.commits.answer_durable()
    assert harness.control.published == [(2, harness.commits.root)]
    assert [(who, reply[:2]) for who, reply in harness.connections.sent if who != "watchers"] == [
        ("sync", ["ok", 1]),
        ("async", ["ok", 2]),
    ]
    assert harness.commit("later", [OP_SET, ["c"], 3])[:2] == ["ok", 3]  # nothing waits: published at once
    assert harness.control.published[-1] == (3, harness.commits.root)


def test_an_async_commit_behind_a_waiting_compaction_root_is_published_at_once(harness):
    harness.commit("a", [OP_SET, ["k"], 1])  # not yet durable: the compaction's root waits for it
    harness.commits.replace_root(harness.commits.root)
    assert harness.commit("b", [OP_SET, ["k"], 2])[:2] == ["ok", 3]
    assert harness.control.published[-1] == (3, harness.commits.root)


@pytest.mark.parametrize("length", [3, 300])  # one atom, and a tree
@pytest.mark.parametrize(
    "ops",
    [
        [[OP_LIST, ["l"], [[LIST_SET, 5000, "x"]]]],  # a tree list wrapped it: l[5000 % 300] was overwritten
        [[OP_LIST, ["l"], [[LIST_DELETE, -5000, None]]]],
        [[OP_SET, ["l", 5000], "x"]],
        [[OP_DELETE, ["l", "x"], None]],  # a small list raised TypeError inside the coordinator
        [[OP_SET, ["l", "x"], 1]],
    ],
)
def test_a_list_index_out_of_range_is_refused_and_changes_nothing(harness, length, ops):
    harness.commit("a", [OP_SET, ["l"], list(range(length))])
    reply = harness.commits.commit(_named("b"), harness.commits.seq, False, "async", codec.encode(ops), [])
    assert reply[:2] == ["error", "PathError"] and "out of range" in reply[2]
    assert list(harness.read("l")) == list(range(length))


def test_a_conflict_names_the_path_and_both_seqs_and_applies_nothing(harness):
    harness.commit("a", [OP_SET, ["users"], {}])
    harness.commit("a", [OP_SET, ["users", "alice"], 1])
    root, enqueued = harness.commits.root, len(harness.durability.enqueued)
    assert harness.commit("b", [OP_SET, ["users", "alice", "x"], 1], base=1) == ["conflict", ["users", "alice"], 1, 2]
    assert harness.commit("b", [OP_SET, ["users", "bob"], 1], base=1)[:2] == ["ok", 3]  # a sibling: no conflict
    harness.commit("c", [OP_SET, ["flag"], 1])
    read_set = [["users", "bob"]]
    assert harness.commit("d", [OP_SET, ["other"], 1], base=2, reads=read_set)[:2] == ["ok", 5]  # reads unchecked
    assert harness.commit("d", [OP_SET, ["other2"], 1], base=2, reads=read_set, serializable=True) == [
        "conflict",
        ["users", "bob"],
        2,
        3,
    ]
    assert harness.commits.conflicts == 2 and harness.applied == 5
    assert len(harness.durability.enqueued) == enqueued + 3 and root != harness.commits.root


def test_a_commit_that_cannot_apply_is_refused_and_changes_nothing(harness):
    harness.commit("a", [OP_SET, ["k"], 1])
    root = harness.commits.root
    assert harness.commit("b", [OP_SET, ["k2"], 1], [OP_SET, ["missing", "y"], 1]) == [
        "error",
        "PathError",
        "commit refused: no container at ('missing', 'y'): the key is missing",
    ]
    assert harness.commit("b", [OP_SET, ["k"], 2], durability="later") == [
        "error",
        "ProtoBaseError",
        "durability must be one of ('sync', 'async'), got 'later'",
    ]
    error, name, message = harness.commit("b", [OP_SET, ["k"], 2], base=5)
    assert (error, name) == ("error", "ProtoBaseError")
    assert "it is based on snapshot seq 5, but the latest commit is seq 1" in message
    assert (harness.commits.seq, harness.commits.root, harness.applied) == (1, root, 1)


def test_written_values_name_one_atom_values_that_nothing_later_in_the_commit_changed(harness):
    reply = harness.commit(
        "a",
        [OP_SET, ["a"], {"x": 1}],
        [OP_SET, ["b"], [1, 2]],
        [OP_SET, ["b", 0], 5],
        [OP_SET, ["c"], 3],
        [OP_SET, ["d"], {"y": 2}],
    )
    indexes = [index for index, _ in reply[2]]
    assert indexes == [0, 4]  # b changed later in the commit, c is a scalar
    ptr = reply[2][1][1]
    assert codec.decode(harness.writer.store.atom(ptr)[1], frozen=False) == {"y": 2}


def test_a_compaction_root_takes_the_next_seq_and_waits_until_every_commit_before_it_is_durable(harness):
    harness.commit("a", [OP_SET, ["k"], 1])  # async: published, not yet durable
    assert harness.commits.replace_root(harness.commits.root) == 2
    assert harness.control.published[-1][0] == 1  # the copy waits for commit 1's record
    harness.durability.durable_lsn = 1
    harness.commits.answer_durable()
    assert harness.control.published[-1][0] == 2
    assert harness.commits.replace_root(harness.commits.root) == 3  # everything durable: published at once
    assert harness.control.published[-1][0] == 3
    harness.commit("b", [OP_SET, ["k"], 2], durability="sync")
    assert harness.commits.replace_root(harness.commits.root) == 5
    assert harness.control.published[-1][0] == 3  # behind commit 4, which waits for its fsync
    harness.durability.durable_lsn = 2
    harness.commits.answer_durable()
    assert harness.control.published[-1][0] == 5


def test_after_a_disk_failure_waiting_and_later_commits_get_the_failure(harness, caplog):
    harness.commit("durable", [OP_SET, ["a"], 1], durability="sync")
    harness.commit("lost", [OP_SET, ["b"], 2], durability="sync")
    harness.durability.durable_lsn = 1  # the first reached the disk before it failed
    with caplog.at_level(logging.ERROR, logger="protobase.coordinator"):
        harness.commits.fail("the write-ahead log failed: ENOSPC")
        harness.commits.fail("again")
    assert [record.getMessage() for record in caplog.records] == [
        "durability failed: the write-ahead log failed: ENOSPC; refusing commits, stopping once the last client "
        "has gone"
    ]
    assert harness.commits.refusing and harness.durability.failure == "the write-ahead log failed: ENOSPC"
    answers = {who: reply for who, reply in harness.connections.sent if who != "watchers"}
    assert answers["durable"][:2] == ["ok", 1]
    assert answers["lost"][:2] == ["error", "CoordinatorError"]
    assert answers["lost"][2].startswith("the write-ahead log failed: ENOSPC. This commit was NOT made durable")
    assert "close every handle on /srv/db" in answers["lost"][2]
    assert harness.commit("later", [OP_SET, ["c"], 3]) == harness.commits.failure_reply()
    assert harness.commits.seq == 2 and harness.control.published == [(1, harness.control.published[0][1])]


def test_the_version_table_is_pruned_only_once_large(harness, monkeypatch):
    from protobase.coordinator import commits as commits_module

    for number in range(5):
        harness.commit("a", [OP_SET, [f"k{number}"], number])
    harness.control.reader_slots = [ReaderSlot(0, 1, 0.0, 3)]
    harness.commits.prune_versions()
    assert len(harness.commits.versions) == 5  # under PRUNE_VERSIONS_ABOVE: kept
    monkeypatch.setattr(commits_module, "PRUNE_VERSIONS_ABOVE", 4)
    harness.commits.prune_versions()
    assert (len(harness.commits.versions), harness.commits.versions.horizon) == (2, 3)


# -- turns for repeated losers (conflicts.py, Reservations) ------------------------------------------


def test_a_loser_gets_a_turn_and_a_commit_refused_meanwhile_is_answered_when_the_turn_ends(harness):
    alice, bob, carol = Named("alice"), Named("bob"), Named("carol")
    harness.commit(alice, [OP_SET, ["k"], 0])
    harness.commit(alice, [OP_SET, ["k"], 1], base=1)
    assert harness.commit(bob, [OP_SET, ["k"], 2], base=1) == ["conflict", ["k"], 1, 2]
    assert harness.commit(bob, [OP_SET, ["k"], 2], base=1) == ["conflict", ["k"], 1, 2]  # twice: bob's turn
    assert harness.commit(carol, [OP_SET, ["k"], 3], base=2) == ["conflict", ["k"], 2, 2]  # bob's turn
    assert harness.commit(carol, [OP_SET, ["k"], 3], base=2) is None  # refused twice in a row: parked
    assert harness.commit(alice, [OP_SET, ["other"], 3], base=2)[:2] == ["ok", 3]  # other paths are free
    assert harness.commit(bob, [OP_SET, ["k"], 4], base=3)[:2] == ["ok", 4]  # bob's retry commits
    parked = [(asker.client, reply) for asker, reply in harness.connections.sent if isinstance(asker, Asker)]
    assert parked == [(carol, ["conflict", ["k"], 2, 4])]  # carol's turn: retry once commit 4 is visible
    assert harness.commit(carol, [OP_SET, ["k"], 5], base=4)[:2] == ["ok", 5]
    assert harness.commits.conflicts == 4 and harness.commits.reservations.turns == 2


def test_the_history_of_one_key_written_again_and_again_is_pruned_too(harness, monkeypatch):
    from protobase.coordinator import commits as commits_module

    monkeypatch.setattr(commits_module, "PRUNE_VERSIONS_ABOVE", 4)
    for number in range(10):
        harness.commit("a", [OP_SET, ["counter"], number])
    assert len(harness.commits.versions) == 1 and len(harness.commits.versions.history) == 10
    harness.commits.prune_versions()  # no reader: up to the published seq
    assert len(harness.commits.versions.history) == 0 and harness.commits.versions.horizon == 10


# -- groups: the commits of one pass of the event loop ---------------------------------------------


def test_a_group_is_written_and_published_once_and_each_commit_logged_under_its_own_seq(harness):
    harness.commit("first", [OP_SET, ["k"], 0])
    replies = harness.group(
        ("a", [[OP_SET, ["a"], {"n": 1}]]),
        ("b", [[OP_SET, ["b"], {"n": 2}], [OP_SET, ["count"], 2]]),
        ("c", [[OP_SET, ["c"], 3]]),
    )
    assert [reply[:2] for reply in replies] == [["ok", 2], ["ok", 3], ["ok", 4]]
    assert [[index for index, _ in reply[2]] for reply in replies] == [[0], [0], []]  # write-through, each its own
    assert harness.control.published[1:] == [(4, harness.commits.root)]  # one publish, of the last seq
    assert [(lsn, record[0]) for lsn, record, _ in harness.durability.enqueued[1:]] == [(2, 2), (3, 3), (4, 4)]
    assert [message for who, message in harness.connections.sent[1:]] == [
        [2, [["a"]]],
        [3, [["b"], ["count"]]],
        [4, [["c"]]],
    ]
    assert (harness.commits.commits, harness.commits.groups, harness.applied) == (4, 2, 2)
    assert [harness.read(key) for key in ("a", "b", "c", "count")] == [{"n": 1}, {"n": 2}, 3, 2]


def test_a_commit_is_validated_against_the_commits_before_it_in_its_group(harness):
    harness.commit("first", [OP_SET, ["users"], {"a": 0}])
    replies = harness.group(
        ("a", [[OP_SET, ["users", "a"], 1]]),
        ("b", [[OP_SET, ["users", "a"], 2]]),  # the same snapshot, the same key: it lost to a
        ("c", [[OP_SET, ["users"], {}]]),  # replaces what a wrote
        ("d", [[OP_SET, ["users", "d"], 4]]),  # a sibling: no conflict
    )
    assert replies[0][:2] == ["ok", 2] and replies[3][:2] == ["ok", 3]
    assert replies[1] == ["conflict", ["users", "a"], 1, 2] and replies[2] == ["conflict", ["users"], 1, 2]
    assert dict(harness.read("users")) == {"a": 1, "d": 4} and harness.commits.conflicts == 2


def test_a_commit_of_a_group_that_cannot_apply_leaves_the_others_as_if_it_never_came(harness):
    harness.commit("first", [OP_SET, ["log"], [0]], [OP_SET, ["other"], [0]], [OP_SET, ["n"], 0])
    replies = harness.group(
        (
            "a",
            [
                [OP_LIST, ["log"], [[LIST_APPEND, 0, 1]]],
                [OP_SET, ["fresh"], [1]],
                [OP_LIST, ["fresh"], [[LIST_APPEND, 0, 2]]],
            ],
        ),
        ("bad", [[OP_SET, ["n"], 1], [OP_SET, ["missing", "y"], 1]]),  # its first op must not stay
        ("c", [[OP_LIST, ["other"], [[LIST_APPEND, 0, 3]]]]),
    )
    assert replies[0][:2] == ["ok", 2] and replies[2][:2] == ["ok", 3]
    assert replies[1][:2] == ["error", "PathError"]
    # Rebuilt from fresh decodes: "a" appended once to the log and to its own new list, not twice.
    assert [list(harness.read(key)) for key in ("log", "fresh", "other")] == [[0, 1], [1, 2], [0, 3]]
    assert harness.read("n") == 0
    assert [record[0] for _, record, _ in harness.durability.enqueued] == [1, 2, 3]


def test_a_sync_group_is_published_and_answered_once_its_last_record_is_durable(harness):
    replies = harness.group(("a", [[OP_SET, ["a"], 1]]), ("b", [[OP_SET, ["b"], 2]]), durability="sync")
    assert replies == [None, None] and harness.control.published == []
    harness.durability.durable_lsn = 1  # a is on disk, b not yet: the root holds both, so it waits
    harness.commits.answer_durable()
    assert harness.control.published == [] and harness.connections.sent == []
    harness.durability.durable_lsn = 2
    harness.commits.answer_durable()
    assert harness.control.published == [(2, harness.commits.root)]
    assert [(who, reply[:2]) for who, reply in harness.connections.sent if who != "watchers"] == [
        ("a", ["ok", 1]),
        ("b", ["ok", 2]),
    ]


def test_a_group_that_fails_to_be_written_changes_nothing(harness, monkeypatch):
    harness.commit("first", [OP_SET, ["k"], 0])
    before = (harness.commits.seq, harness.commits.root, len(harness.durability.enqueued), harness.control.published)

    def broken_flush(root: Any) -> int:
        raise RuntimeError("a bug")

    monkeypatch.setattr(harness.writer, "flush", broken_flush)
    with pytest.raises(GroupFailed):
        harness.group(("a", [[OP_SET, ["a"], 1]]), ("b", [[OP_SET, ["b"], 2]]))
    assert (
        harness.commits.seq,
        harness.commits.root,
        len(harness.durability.enqueued),
        harness.control.published,
    ) == before
    monkeypatch.undo()
    assert [reply[:2] for reply in harness.group(("a", [[OP_SET, ["a"], 1]]))] == [["ok", 2]]  # its seq was not taken


def test_a_value_too_big_to_store_refuses_its_commit_alone_but_a_group_is_then_served_one_by_one(harness, monkeypatch):
    from protobase.core import arena as arena_module

    monkeypatch.setattr(arena_module, "MAX_PAYLOAD", 1000)
    big = "x" * 2000
    (reply,) = harness.group(("a", [[OP_SET, ["a"], big]]))
    assert reply[:2] == ["error", "EncodingError"] and harness.commits.seq == 0
    with pytest.raises(GroupFailed):
        harness.group(("a", [[OP_SET, ["a"], 1]]), ("b", [[OP_SET, ["b"], big]]))
    assert harness.commits.seq == 0


def test_a_disk_failure_while_a_group_is_logged_refuses_all_of_it(harness):
    def failing_enqueue(payload: bytes, sync: bool) -> int:
        raise DurabilityFailed("the write-ahead log failed: EIO")

    harness.durability.enqueue = failing_enqueue  # type: ignore[method-assign]
    replies = harness.group(("a", [[OP_SET, ["a"], 1]]), ("b", [[OP_SET, ["a"], 2]]))
    assert replies[0][:2] == ["error", "CoordinatorError"] and replies[1][0] == "conflict"
    assert harness.commits.refusing and harness.control.published == []


def test_a_commit_parked_for_a_turn_inside_a_group_leaves_the_others_answers_in_place(harness):
    alice, carol, dave = Named("alice"), Named("carol"), Named("dave")
    harness.commit(alice, [OP_SET, ["k"], 0])
    harness.commit(dave, [OP_SET, ["k"], 1], base=1)
    harness.commit(alice, [OP_SET, ["k"], 2], base=1)
    harness.commit(alice, [OP_SET, ["k"], 2], base=1)  # alice lost twice: her turn at k
    assert harness.commit(carol, [OP_SET, ["k"], 3]) == ["conflict", ["k"], 2, 2]  # alice's turn: refused
    replies = harness.group((carol, [[OP_SET, ["k"], 3]]), (dave, [[OP_SET, ["other"], 4]]))
    assert replies[0] is None and replies[1][:2] == ["ok", 3]  # carol parked; dave's commit is his
    assert harness.read("other") == 4 and harness.read("k") == 1
    harness.commit(alice, [OP_SET, ["k"], 5])
    parked = [(asker.client, reply) for asker, reply in harness.connections.sent if isinstance(asker, Asker)]
    assert parked == [(carol, ["conflict", ["k"], 2, 4])]
