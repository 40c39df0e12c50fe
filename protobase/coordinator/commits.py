"""The commit sequence: validating and applying each commit, and publishing roots in order.

Owns the coordinator's latest commit (`seq`, `root`), the published root, the
version table (conflicts.py) and the commits that wait for their WAL record
to be fsynced. Runs in the coordinator process, in its event loop, one group
of commits at a time and each group's commits in order: that is what
serialises commits. A group is every commit the loop read in one pass (the
server queues them): each is validated against the state its predecessors
left, all are applied to one working root, and the root is written once and
published once, so commits arriving together share the path copies near the
root, the publish and the wake-ups (`commit_group`).

A commit is checked (`parse_ops`: the ops are data of known shapes, since the
socket is untrusted), validated against the version table (a key it wrote,
or read in serializable mode, changed after its snapshot: a conflict; so is
a write at a path another client holds a turn at, conflicts.py's Reservations),
applied to the latest root by path copying and written to atoms (writer.py),
and handed to the persistence process (durability.py) under its own seq. An
"async" commit is then published and acknowledged at once; a "sync" one waits
in `pending` until the durable LSN covers its record (`answer_durable`), and
so does every root published after it (an "async" commit's, a compaction's),
since roots are published in order and each holds the commits before it.

Once durability failed (a disk error), every waiting and later commit is
answered with that failure (`fail`): never acknowledged, never published.

Invariants: `published_seq <= seq`; `pending` is in LSN order, and a root is
published only once every commit before it is durable (or "async"); no
snapshot shows a "sync" commit whose WAL record is not fsynced.
"""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protobase.coordinator.clients import Asker, Connections
from protobase.coordinator.conflicts import KeyPath, Reservations, VersionTable, validated_paths
from protobase.coordinator.durability import Durability, DurabilityFailed
from protobase.coordinator.writer import WRITE_THROUGH_AT_MOST, Writer, decode_ops
from protobase.core import codec
from protobase.core.codec import Packed, PlainRecords
from protobase.errors import CoordinatorError, CorruptionError, PathError, ProtoBaseError, ProtocolError
from protobase.keyorder import check_key
from protobase.shm.control import ControlBlock
from protobase.wire.error_table import error_fields, error_reply
from protobase.wire.opcodes import (
    INCR_LIMIT,
    LIST_APPEND,
    LIST_DELETE,
    LIST_INSERT,
    LIST_SET,
    OP_CREATE_INDEX,
    OP_DELETE,
    OP_DROP_INDEX,
    OP_INCR,
    OP_LIST,
    OP_SET,
    OP_SET_ADD,
    OP_SET_DISCARD,
)

__all__ = [
    "Commits",
    "GroupFailed",
    "Pending",
    "Request",
    "parse_ops",
    "wal_record",
    "DURABILITY_MODES",
    "PRUNE_VERSIONS_ABOVE",
]

log = logging.getLogger("protobase.coordinator")

DURABILITY_MODES = ("sync", "async")
PRUNE_VERSIONS_ABOVE = 100_000  # paths (or commits) in the version table past which housekeeping prunes it
PRUNE_PATHS_PER_TICK = 20_000  # at most this many written paths forgotten per tick: a few ms

Op = list[Any]  # [op code, key path (a list), argument]: one operation of a commit, as decoded
Reply = list[Any]  # [status, *fields]: a reply without its request id

_OP_ARGUMENT_TYPES: dict[int, tuple[type, ...]] = {  # {op code -> what its argument may be}
    OP_SET: (object,),
    OP_DELETE: (type(None),),
    OP_LIST: (list,),
    OP_SET_ADD: (list,),
    OP_SET_DISCARD: (list,),
    OP_CREATE_INDEX: (str, tuple),
    OP_DROP_INDEX: (str, tuple),
    OP_INCR: (int, float),  # (not bool: see parse_ops)
}
_LIST_OP_CODES = (LIST_APPEND, LIST_SET, LIST_INSERT, LIST_DELETE)
INDEX_LIMIT = 1 << 63  # a list index is a signed 64-bit int (a list holds far fewer entries)


def parse_ops(ops_bytes: bytes, records: PlainRecords | None = None) -> list[Op]:
    """A commit's ops, decoded, each checked to be [known code, key path, argument of that code's type].

    Raises ProtocolError (nothing applied) for ops no client of ours sends,
    EncodingError for a key no stored dict may have and for an internal
    reference (see `decode_ops`, which keeps the plain `records` as Packed).
    """
    try:
        ops = decode_ops(ops_bytes, records)
    except CorruptionError as error:
        raise ProtocolError(f"malformed request: the commit's ops cannot be decoded ({error})") from None
    if type(ops) is not list or not ops:
        raise ProtocolError("malformed request: a commit's ops are a non-empty array")
    for op in ops:
        if type(op) is not list or len(op) != 3 or type(op[0]) is not int or type(op[1]) is not list:
            raise ProtocolError("malformed request: an op is [code, key path, argument]")
        code, path, argument = op
        if code not in _OP_ARGUMENT_TYPES or not isinstance(argument, _OP_ARGUMENT_TYPES[code]):
            raise ProtocolError(
                f"malformed request: op code {code} with an argument of type {_type_name(argument)} is not an operation"
            )
        for key in path:
            kind = type(key)
            if kind is int or (kind is str and key.isascii()):
                continue  # the usual keys, which check_key accepts as they are: a bulk commit has millions
            check_key(codec.unpacked(key), tuple(path))
        if code == OP_LIST and not all(
            type(item) is list and len(item) == 3 and item[0] in _LIST_OP_CODES and _is_list_index(item[0], item[1])
            for item in op[2]
        ):  # (op[2] is the argument: a list, checked above)
            raise ProtocolError(
                "malformed request: a list operation is [code, index (a 64-bit int; None to append), value]"
            )
        if code == OP_SET_ADD or code == OP_SET_DISCARD:
            for element in op[2]:  # (a list, checked above)
                kind = type(element)
                if kind is not int and not (kind is str and element.isascii()):
                    check_key(codec.unpacked(element), tuple(path))  # an element of a stored set is a key, as a dict's
        if code == OP_INCR and not _is_increment(argument):
            shown = repr(argument)[:40]  # (an int of any size decodes)
            raise ProtocolError(f"malformed request: an increment is a 64-bit int or a finite float, got {shown}")
    return ops


def wal_record(seq: int, ops_bytes: bytes) -> list[bytes]:
    """The WAL payload of commit `seq`, `encode([seq, ops_bytes])`, as parts: the ops are not copied into it."""
    return [codec.array_header(2) + codec.pack(seq) + codec.bin_header(len(ops_bytes)), ops_bytes]


def _type_name(value: Any) -> str:
    return type(codec.unpacked(value)).__name__  # a Packed is named the dict the client sent


def _is_list_index(code: int, index: Any) -> bool:
    if index is None:
        return code == LIST_APPEND  # (an append's index is not used)
    return type(index) is int and -INDEX_LIMIT <= index < INDEX_LIMIT


def _is_increment(n: Any) -> bool:
    if type(n) is int:
        return -INCR_LIMIT < n < INCR_LIMIT
    return type(n) is float and math.isfinite(n)


@dataclass
class Pending:
    """A root waiting for its WAL record to be durable before it is published (and acknowledged)."""

    lsn: int
    seq: int
    root: int
    asker: Asker | None  # whom to answer, None for a compaction
    reply: Reply | None
    paths: list[KeyPath] = field(default_factory=list)  # what the commit wrote, for watchers


Request = tuple[Asker, list[Any]]  # a commit request: who asks, [base, serializable, durability, ops, reads]


class GroupFailed(Exception):
    """Applying or writing a group of commits failed for a reason no refusal names; nothing was changed."""


@dataclass
class _Applied:
    """A commit of the group being applied: what the rest of its way (seq, WAL, reply) needs."""

    asker: Asker
    seq: int
    ops: list[Op]
    paths: list[KeyPath]
    ops_bytes: bytes
    sync: bool


class _Group:
    """The commits of one pass applied so far: their working root and what they wrote."""

    def __init__(self, root: Any, seq: int) -> None:
        self.working: Any = root  # the latest root with the group's commits applied, not yet written
        self.latest_seq = seq  # the seq before the group
        self.versions = VersionTable()  # what the group wrote, seen by its later commits' validation
        self.applied: list[_Applied] = []
        self.more_to_come = False  # whether a commit of the group follows the one being applied
        # [(conflict reply, asker, path, base, blocked, eager)]: losses, counted once the group is done
        self.losses: list[tuple[Reply, Asker, KeyPath, int, bool, bool]] = []

    @property
    def next_seq(self) -> int:
        return self.latest_seq + len(self.applied) + 1


class Commits:
    """Validates, applies, publishes and acknowledges commits, one at a time."""

    def __init__(
        self,
        writer: Writer,
        control: ControlBlock,
        durability: Durability,
        connections: Connections,
        *,
        seq: int,
        root: int,
        directory: str,
        on_applied: Callable[[], None],
    ) -> None:
        self.writer = writer  # applies a commit's ops to the latest root and writes its atoms
        self.control = control  # where roots are published (the seqlock)
        self.durability = durability  # takes each commit's WAL record; says what is durable
        self.connections = connections  # whom replies and watch notifications go to
        self.directory = directory  # the data directory's path, for messages
        self.on_applied = on_applied  # called after each commit that was applied (compaction, checkpoints)
        self.versions = VersionTable()
        # Commits before the restart are not in the version table: a transaction
        # based on one of them cannot be checked, so it is refused as a conflict.
        self.versions.horizon = seq
        self.reservations = Reservations(self._turn_started)  # turns for clients that keep losing a key path
        self.seq = seq  # sequence number of the latest commit (maybe not yet published)
        self.root = root  # its root pointer
        self.published_seq = 0  # sequence number of the published root
        self.pending: collections.deque[Pending] = collections.deque()  # in LSN order
        self.commits = 0  # commits applied since start
        self.groups = 0  # groups they were applied in
        self.conflicts = 0  # commits refused for a conflict since start
        self.refusing = False  # True once durability failed: every commit is refused from then on
        # While a compaction is made in steps, the ops of every commit applied meanwhile (reclamation.py
        # replays them onto the copy), else None.
        self.recording: list[bytes] | None = None

    def commit(
        self, asker: Asker, base: int, serializable: bool, durability: str, ops_bytes: bytes, reads: list[Any]
    ) -> Reply | None:
        """Validate, apply, write, log and publish one transaction: a group of one (`commit_group`)."""
        (reply,) = self.commit_group([(asker, [base, serializable, durability, ops_bytes, reads])])
        return reply

    def commit_group(self, requests: list[Request]) -> list[Reply | None]:
        """Commit every request of one pass of the event loop, in order, with one flush and one publish.

        Each is validated against the latest state, earlier commits of the
        group included, and applied to one working root; the root is written
        once, then each commit gets its own seq and WAL record, and the root is
        published once (for "sync" commits: once the group's last record is
        durable). The replies, in request order: None for a commit that waits
        for fsync; a refusal (conflict, error) changes nothing. All requests
        must ask for the same durability (the server groups them so): one
        published root must not hold an "async" commit waiting behind a "sync" one.

        Raises GroupFailed, having changed nothing, when applying or writing
        failed for a reason no refusal names (a bug): serve them one at a time.
        When the WAL fails, every commit of the group is refused (`fail`).
        """
        if self.durability.failure:
            return [self.failure_reply() for _ in requests]
        group = _Group(self.root, self.seq)
        self.writer.begin()
        replies: list[Reply | None] = []
        for index, (asker, arguments) in enumerate(requests):
            group.more_to_come = index < len(requests) - 1
            try:
                replies.append(self._apply(group, asker, *arguments))
            except ProtoBaseError as error:
                replies.append(error_reply(error))
            except Exception as error:
                raise GroupFailed(error) from error
        if group.applied:
            try:
                root = self.writer.flush(group.working)
            except ProtoBaseError as error:  # a value that cannot be stored (EncodingError): refuse its commit
                if len(group.applied) > 1:
                    raise GroupFailed(error) from error  # which commit holds it? one at a time tells
                replies[replies.index(None)] = error_reply(error)
                return self._count_losses(group, replies)
            except Exception as error:
                raise GroupFailed(error) from error
            self._log_and_publish(group, root, replies)
        return self._count_losses(group, replies)

    def _count_losses(self, group: _Group, replies: list[Reply | None]) -> list[Reply | None]:
        """Count the group's conflicts as their clients' losses (conflicts.py, Reservations).

        Once the group is done, so that a group that fails changes nothing. A
        client that queued for a turn gets None: its conflict is answered when
        its turn starts (`_turn_started`).
        """
        for reply, asker, path, base, blocked, eager in group.losses:
            if self.reservations.lost(asker.client, path, (asker.request_id, base), blocked, eager):
                replies[next(i for i, candidate in enumerate(replies) if candidate is reply)] = None
        return replies

    def _apply(
        self,
        group: _Group,
        asker: Asker,
        base: int,
        serializable: bool,
        durability: str,
        ops_bytes: bytes,
        reads: list[Any],
    ) -> Reply | None:
        """Validate one commit and apply it to the group's working root; its refusal, or None once applied."""
        if durability not in DURABILITY_MODES:
            return error_fields(ProtoBaseError, f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
        if type(base) is not int or not 0 <= base <= self.seq:
            raise ProtoBaseError(
                f"commit refused, nothing was applied: it is based on snapshot seq {base!r}, but "
                f"the latest commit is seq {self.seq}; a transaction is based on the seq of the "
                f"snapshot it read"
            )
        ops = parse_ops(ops_bytes, self.writer.records)
        paths = [tuple(op[1]) for op in ops]
        checked = validated_paths(ops, paths)  # an increment's path is not validated (it commutes)
        if serializable:
            checked += [tuple(path) for path in reads]
        conflict = group.versions.first_conflict(base, checked) if group.applied else None
        conflict = conflict or self.versions.first_conflict(base, checked)
        blocked = False  # refused for another client's turn at a path it writes
        if conflict is None and self.reservations.holders:
            reserved = self.reservations.blocking(asker.client, paths)
            blocked, conflict = reserved is not None, None if reserved is None else (reserved, self.seq)
        if conflict is not None:
            self.conflicts += 1
            path, seq = conflict
            reply = ["conflict", list(path), base, seq]
            group.losses.append((reply, asker, path, base, blocked, durability == "sync"))
            return reply
        try:
            group.working = self._apply_ops(group.working, ops, paths)
        except ProtoBaseError as error:
            # Undo its first ops: the working root is changed in place, and the values they wrote
            # must not be named to anyone (Writer.begin).
            group.working = self._reapply(group)
            if type(error) is not PathError:
                raise  # refused with its own error (commit_group)
            return error_fields(PathError, f"commit refused: {error}")
        applied = _Applied(asker, group.next_seq, ops, paths, ops_bytes, durability == "sync")
        if group.more_to_come:  # (only later commits of the group look: a bulk commit's million paths need not)
            group.versions.record(applied.seq, paths)
        group.applied.append(applied)
        return None

    def _apply_ops(self, root: Any, ops: list[Op], paths: list[KeyPath]) -> Any:
        return self.writer.apply_all(root, [(code, path, argument) for (code, _, argument), path in zip(ops, paths)])

    def _reapply(self, group: _Group) -> Any:
        """The group's working root rebuilt from the latest root: its applied commits, decoded afresh.

        Afresh, since applying a commit may change its own decoded values in
        place (a list op appends to the list an earlier op of it SET).
        """
        working: Any = self.root
        self.writer.begin()
        for applied in group.applied:
            applied.ops = parse_ops(applied.ops_bytes, self.writer.records)
            working = self._apply_ops(working, applied.ops, applied.paths)
        return working

    def _log_and_publish(self, group: _Group, root: int, replies: list[Reply | None]) -> None:
        """The group is written at `root`: log each commit under its seq, then publish and answer them."""
        self.root = root
        self.seq = group.applied[-1].seq
        self.commits += len(group.applied)
        self.groups += 1
        for applied in group.applied:  # their runs of losses (and their turns) end
            self.reservations.won(applied.asker.client)
        slots = [index for index, reply in enumerate(replies) if reply is None]
        try:
            lsn = 0
            for applied in group.applied:
                self.versions.record(applied.seq, applied.paths)
                lsn = self.durability.enqueue(wal_record(applied.seq, applied.ops_bytes), sync=applied.sync)
        except DurabilityFailed as error:  # none of them is acknowledged: see `fail`
            for index in slots:
                replies[index] = self.failure_reply()
            self.fail(str(error))
            return
        if self.recording is not None:
            self.recording.extend(applied.ops_bytes for applied in group.applied)
        for index, applied in zip(slots, group.applied):
            reply: Reply = ["ok", applied.seq, self._written_values(applied.ops, applied.paths)]
            if applied.sync:  # answered with the group, once its last record is durable
                self.pending.append(Pending(lsn, applied.seq, root, applied.asker, reply, applied.paths))
            else:
                replies[index] = reply
        if not group.applied[0].sync:
            if any(pending.asker is not None for pending in self.pending):
                self._wait_behind_sync(group, root, replies, slots)
            else:
                self.publish(self.seq, root)
                for applied in group.applied:
                    self.connections.notify(applied.seq, applied.paths)
        self.on_applied()

    def _wait_behind_sync(self, group: _Group, root: int, replies: list[Reply | None], slots: list[int]) -> None:
        """Hold an "async" group until the "sync" commits before it are durable: its root holds their data.

        Published now, it would show readers a commit a crash could take back;
        answered now, its client would not see its own commit in its next snapshot.
        """
        behind = self.pending[-1].lsn  # the newest record waited for (pending is in LSN order)
        for index, applied in zip(slots, group.applied):
            self.pending.append(Pending(behind, applied.seq, root, applied.asker, replies[index], applied.paths))
            replies[index] = None

    def _turn_started(self, client: Any, token: tuple[int, int], path: KeyPath) -> None:
        """Answer a conflict parked until its client's turn at `path` (conflicts.py, Reservations).

        It names the latest commit, which the client waits to see published before its retry.
        """
        request_id, base = token
        self.connections.answer(Asker(client, request_id), ["conflict", list(path), base, self.seq])

    def _written_values(self, ops: list[Op], paths: list[KeyPath]) -> list[list[int]]:
        # Tell the client where each SET value now lives, so it can cache the
        # value it already holds (write-through). Only for values nothing later
        # in the commit changed, and only for values stored as one atom. (No
        # other commit of its group changed them: their paths would conflict.)
        # Walk backwards keeping every prefix of the later paths: one set lookup
        # per op, not a scan of the later ops (which made a 10k-key commit quadratic).
        if len(ops) > WRITE_THROUGH_AT_MOST:
            return []  # the writer names only so many values: not worth a walk over a bulk commit's ops
        pointers = []
        later: set[KeyPath] = set()  # {prefix of a path written later in this commit}
        for index in range(len(ops) - 1, -1, -1):
            code, _, argument = ops[index]
            path = paths[index]
            changed_later = path in later
            later.update(path[:end] for end in range(1, len(path) + 1))
            if changed_later or code != OP_SET or not isinstance(argument, (dict, list, set, tuple, Packed)):
                continue
            ptr = self.writer.flat_pointer(argument)
            if ptr:
                pointers.append([index, ptr])
        pointers.reverse()
        return pointers

    # -- publishing -----------------------------------------------------------------

    def publish(self, seq: int, root: int) -> None:
        """Show readers the root of commit `seq` (unless a later one is shown already)."""
        if seq > self.published_seq or seq == 0:
            self.published_seq = seq
            self.control.publish_root(seq, root)

    def replace_root(self, root: int) -> int:
        """Make `root`, which holds the same data (a compaction's copy), the latest; return its seq.

        It is published once every commit before it is durable, like a commit.
        """
        self.root = root
        self.seq += 1
        lsn = self.durability.next_lsn - 1
        if lsn <= self.durability.durable_lsn and not self.pending:
            self.publish(self.seq, root)
        else:
            self.pending.append(Pending(lsn, self.seq, root, None, None))
        return self.seq

    def answer_durable(self) -> None:
        """Publish and acknowledge the waiting commits the durable LSN now covers."""
        durable = self.durability.durable_lsn  # (the persistence process publishes it in the control block)
        newest = None
        answered = []
        while self.pending and self.pending[0].lsn <= durable:
            newest = self.pending.popleft()
            answered.append(newest)
        if newest is not None:
            self.publish(newest.seq, newest.root)
        for pending in answered:
            self.connections.notify(pending.seq, pending.paths)
            self.connections.answer(pending.asker, pending.reply)

    def prune_versions(self) -> None:
        """Forget the writes no transaction can be based before, once the version table grew large.

        (Every housekeeping tick: so it also ends the turns whose hold is over, answering whoever is next.)
        """
        self.reservations.expire()
        if max(len(self.versions), len(self.versions.history)) > PRUNE_VERSIONS_ABOVE:  # (one hot key: a long history)
            oldest = self.control.oldest_snapshot()
            self.versions.prune(self.published_seq if oldest is None else oldest, budget=PRUNE_PATHS_PER_TICK)

    # -- a failed disk ----------------------------------------------------------------

    def failure_reply(self) -> Reply:
        """The error reply to a commit refused because the WAL failed: what happened, and what to do."""
        return error_fields(
            CoordinatorError,
            f"{self.durability.failure}. This commit was NOT made durable and is not committed, nor is any "
            f"later one. Fix the disk (free space, check the device), close every handle on "
            f"{self.directory} (its coordinator stops once the last one is closed), then open it again: "
            f"recovery restores every commit whose WAL record reached the disk, which includes every "
            f'"sync" commit that returned ("async" commits of the last flush interval may be lost)',
        )

    def fail(self, why: str) -> None:
        """Stop acknowledging: answer every waiting commit with the failure, and refuse all later ones.

        The coordinator serves on, so that every commit gets the failure as its
        answer rather than a lost connection, until its last client has gone
        (its housekeeping); readers keep their snapshots meanwhile.
        """
        if self.durability.failure is None:
            self.durability.failure = why
        if not self.refusing:
            log.error("durability failed: %s; refusing commits, stopping once the last client has gone", why)
            self.refusing = True
        self.answer_durable()  # those the WAL holds did commit: only the others failed
        while self.pending:
            pending = self.pending.popleft()
            self.connections.answer(pending.asker, self.failure_reply())
