"""A Database handle's session with its coordinator: connection, reader slot, pins, store, commits.

Owns, for one handle in one client process: the Connection to the
coordinator, the mapped control block, the reader slot the coordinator
assigned, the count of pins this process holds on each snapshot, the Store
(pointer -> object, with its caches) and the sending and collecting of
commits. Snapshots, transactions, the pool, stats and check use it through
the public names below; the Database façade (protobase/database.py) owns one.
Runs in client processes (and pool workers, which open one each).

A session outlives its connection: it reattaches after an interrupted
exchange broke the stream, after the coordinator stopped (the next use starts
one), or after it restarted. `epoch` counts the coordinator instances it has
attached to: a pin, a snapshot or a commit of an older epoch belongs to
memory that is gone, and says so (CoordinatorRestartedError).

Invariant (the reader protocol of shm/control.py): while this process holds
any pin of the current instance, its reader slot holds the oldest pinned
seq, so the coordinator never unlinks memory a snapshot of ours can reach.
Pins move to a new slot before the old one is given up. `lock` guards the
connection and the pin counts; every method takes it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from protobase.client import launcher
from protobase.client.connection import Connection, Refusal
from protobase.core import codec
from protobase.core.arena import AtomReader
from protobase.core.datadir import FORMAT_VERSION, DataDir
from protobase.core.frozen import freeze
from protobase.core.store import DEFAULT_BYTES_CACHE, DEFAULT_OBJECT_CACHE, Store
from protobase.core.views import TreeDict
from protobase.errors import (
    ConflictError,
    CoordinatorError,
    CoordinatorRestartedError,
    DatabaseClosedError,
    EncodingError,
    OutcomeUnknownError,
)
from protobase.settings import DEFAULTS
from protobase.shm import names
from protobase.shm.control import ControlBlock, full_fence
from protobase.wire.error_table import error_from_reply
from protobase.wire.verbs import Durability

__all__ = ["Session", "Launch", "CommitRequest", "Pin", "ATTACH_TIMEOUT"]

log = logging.getLogger("protobase")

ATTACH_TIMEOUT = 60.0  # seconds to keep retrying while a stopping coordinator gives way

#: (seq, root, epoch): a pinned snapshot's sequence number, its root mapping, and the session's epoch
#: when pinned. A plain tuple: taking a snapshot is on the warm-read path.
Pin = tuple[int, TreeDict, int]


@dataclass(frozen=True)
class Launch:
    """How a session reaches its coordinator: whether it may start one, and that one's settings.

    The settings configure a coordinator this session starts; a running one
    keeps its own.
    """

    start: bool = True  # start a coordinator when none serves the directory
    grace: float = 2.0  # seconds a started coordinator lingers after its last client
    flush_interval: float | None = None
    checkpoint_bytes: int | None = None
    compact_min_bytes: int | None = None
    reader_slots: int | None = None
    busy_poll: float | None = None  # this session's (and a started coordinator's); None: the default

    def connect(self, datadir: DataDir) -> Connection:
        """A new connection to the coordinator of `datadir`, starting one if allowed."""
        return Connection(
            launcher.connect(
                datadir,
                start=self.start,
                grace=self.grace,
                compact_min_bytes=self.compact_min_bytes,
                checkpoint_bytes=self.checkpoint_bytes,
                flush_interval=self.flush_interval,
                reader_slots=self.reader_slots,
                busy_poll=self.busy_poll,
            ),
            busy_poll=DEFAULTS.busy_poll if self.busy_poll is None else self.busy_poll,
        )


@dataclass
class CommitRequest:
    """A transaction's commit request, and once sent, where to collect its answer."""

    message: list[Any]  # the request, without its id
    epoch: int  # the session's epoch of the transaction's snapshot
    ops: list[Any]  # the ops sent, for write-through
    connection: Connection | None = None  # the connection it goes out on: its reply comes back there
    request_id: int | None = None  # set just before it is sent

    def release(self) -> None:
        """Forget its answer, once the transaction has recorded it."""
        if self.connection is not None and self.request_id is not None:
            self.connection.release(self.request_id)

    @property
    def may_have_been_sent(self) -> bool:
        """False only if it certainly never reached the coordinator (interrupted before it went out)."""
        return (
            self.connection is not None
            and self.request_id is not None
            and self.connection.may_have_sent(self.request_id)
        )


class Session:
    """One handle's attachment to the coordinator of one data directory, across reconnections."""

    def __init__(
        self,
        datadir: DataDir,
        launch: Launch | None = None,
        *,
        durability: Durability = "sync",
        cache_size: int = DEFAULT_OBJECT_CACHE,
    ) -> None:
        self.datadir = datadir
        self.path = datadir.path
        self.durability: Durability = durability  # default durability of commits that name none
        self._launch = launch or Launch()
        self._cache_size = cache_size
        self.lock = threading.RLock()  # guards the connection and the pin counts
        self._held: dict[int, int] = {}  # {snapshot seq -> open snapshots and transactions on it}
        self._closed = False
        self._connection: Connection | None = None
        self._control: ControlBlock | None = None
        self._store: Store | None = None  # one per coordinator instance
        self._slot = 0  # our reader slot in the control block
        self._pid = os.getpid()  # the process the connection, slot and pins belong to
        self._oldest_segment = 0  # the control block's oldest segment when we last looked
        self.instance_id = ""  # of the coordinator instance attached to
        self.epoch = 0  # bumped when we attach to a new coordinator instance: older pins are void
        self._attach()
        _open_sessions.add(self)

    # -- what the other client modules read ----------------------------------------------

    @property
    def store(self) -> Store:
        """Pointer -> object for the current coordinator instance, with this process's caches."""
        assert self._store is not None, "a session has a store from its first attach on"
        return self._store

    @property
    def control(self) -> ControlBlock:
        """The mapped control block; only while attached (after a pin or a request)."""
        assert self._control is not None, "the session is not attached: pin or request first"
        return self._control

    @property
    def connection(self) -> Connection:
        """The connection to the coordinator; only while attached."""
        assert self._connection is not None, "the session is not attached: pin or request first"
        return self._connection

    @property
    def slot(self) -> int:
        """Our reader slot in the control block (a new one after each reattach)."""
        return self._slot

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pid(self) -> int:
        """The process this session's connection, slot and pins belong to (a forked child's own once it forked)."""
        return self._pid

    # -- attaching -----------------------------------------------------------------

    def ensure_attached(self) -> None:
        """Raise if closed; (re)attach if we have no connection, it broke, or the coordinator went away."""
        if self._closed:
            raise DatabaseClosedError(f"database {self.path} is closed; open it again with protobase.open()")
        if self._connection is None or not self._connection.peer_alive():
            self._attach()

    def _attach(self) -> None:
        """Connect to the coordinator (starting one if allowed) and map its control block.

        Also how a session recovers: after an interrupted exchange broke the
        connection, or after the coordinator stopped or restarted. On the same
        instance our pins move to the new reader slot before the old slot is
        given up (with the old connection), so no snapshot of ours is
        unprotected for a moment; on a new instance they are void, and the
        snapshots and transactions that held them fail with
        CoordinatorRestartedError when next used.
        """
        connection, instance_id, slot = self._hello()
        try:
            control = ControlBlock.attach(names.control_name(instance_id))
        except BaseException:
            connection.close()
            raise
        same_instance = self._store is not None and self._store.reader.instance_id == instance_id
        if same_instance and self._held:
            control.set_reader_snapshot(slot, min(self._held))
            full_fence()  # our pin is visible before the old slot is released
        self._detach()
        self.instance_id = instance_id
        self._connection, self._control, self._slot = connection, control, slot
        self._pid = os.getpid()
        if not same_instance:
            self.epoch += 1
            self._held.clear()
            self._store = Store(
                AtomReader(instance_id),
                object_cache=self._cache_size,
                bytes_cache=min(self._cache_size, DEFAULT_BYTES_CACHE),
            )
        self._oldest_segment = control.oldest_segment

    def _hello(self) -> tuple[Connection, str, int]:
        """A new connection that the coordinator greeted: (connection, its instance id, our reader slot)."""
        deadline = time.monotonic() + ATTACH_TIMEOUT
        while True:
            connection = self._launch.connect(self.datadir)
            try:
                reply = self._exchange(connection, ["hello", FORMAT_VERSION])
                break
            except Refusal as refusal:  # e.g. out of file descriptors: its message says what to do
                connection.close()
                raise refusal.error from None
            except CoordinatorError:
                # The coordinator was stopping (its grace ran out) as we connected:
                # once it has gone, the next connect starts a fresh one.
                connection.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        instance_id, slot = reply[1], reply[2]
        if not names.is_instance_id(instance_id):
            connection.close()
            raise CoordinatorError(f"coordinator sent a malformed instance id {instance_id!r}")
        return connection, instance_id, slot

    def _detach(self) -> None:
        """Close our connection (the coordinator frees our reader slot) and unmap the control block."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._control is not None:
            self._control.close()
            self._control = None

    def after_fork(self) -> None:
        """In a forked child: the parent's socket, slot and pins are the parent's; the next use attaches anew."""
        self.lock = threading.RLock()
        self._held = {}
        if self._connection is not None:
            self._connection.close()  # our copy of the descriptor only: the parent's stays open
            self._connection = None
        self._control = None
        self._pid = os.getpid()

    def close(self) -> None:
        """Detach for good, dropping the caches and the mappings. Idempotent."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            self._detach()
            if self._store is not None:
                self._store.clear()
                self._store.reader.close()
        _open_sessions.discard(self)

    # -- talking to the coordinator ---------------------------------------------------

    def request(self, message: list[Any]) -> list[Any]:
        """One request and its reply ([status, ...]), reattaching first if needed.

        A reply of "error" is raised as the error it names; a lost connection
        as CoordinatorError.
        """
        with self.lock:
            self.ensure_attached()
            return self._exchange(self.connection, message)

    def _exchange(self, connection: Connection, message: list[Any]) -> list[Any]:
        """One request and its reply; a reply of "error" is raised as the error it names."""
        try:
            reply: list[Any] = connection.request(message)
        except Refusal:
            raise  # it says why, and what to do
        except (OSError, CoordinatorError) as error:
            raise self._lost(error) from None
        if reply[0] == "error":
            raise error_from_reply(reply)
        return reply

    def _lost(self, error: BaseException, outcome: str = "") -> CoordinatorError:
        return CoordinatorError(
            f"lost the coordinator of {self.path} ({error}): it stopped or died.{outcome} Committed data is "
            f"kept as its durability mode promises; the next snapshot or transaction of this handle reconnects"
        )

    # -- commits -------------------------------------------------------------------------

    def prepare_commit(
        self,
        epoch: int,
        base: int,
        serializable: bool,
        durability: Durability | None,
        ops: list[Any],
        reads: list[Any],
        check_encodable: Callable[[list[Any]], None],
    ) -> CommitRequest:
        """The commit request of a transaction, encoded; EncodingError names the user's path.

        `durability` None means the session's default.
        """
        try:
            ops_bytes = codec.encode(ops)
        except EncodingError:
            check_encodable(ops)  # raises with the user's path
            raise
        message = ["commit", base, serializable, durability or self.durability, ops_bytes, reads]
        return CommitRequest(message, epoch, ops)

    def send_commit(self, request: CommitRequest) -> None:
        """Send a commit request whole; raises, with nothing committed, if it cannot go out."""
        with self.lock:
            self.ensure_attached()
            if request.epoch != self.epoch:
                raise CoordinatorRestartedError(
                    f"the coordinator of {self.path} restarted while this transaction was open (it read "
                    f"snapshot {request.message[1]} of the previous instance); nothing was committed. Run it "
                    f"again: @db.transactional(retries=N) and db.attempts(retries=N) do"
                )
            connection = request.connection = self.connection
            request.request_id = connection.reserve()
            try:
                connection.send(request.request_id, request.message)
            except OSError as error:
                raise self._lost(error, " Nothing was committed.") from None

    def await_commit(self, request: CommitRequest, timeout: float | None = None) -> int | None:
        """The seq a sent commit committed as; None if no answer came within `timeout`.

        Raises ConflictError or the error the coordinator answered (nothing was
        committed), and OutcomeUnknownError when the connection was lost before
        the answer.
        """
        assert request.connection is not None and request.request_id is not None, "the commit was never sent"
        with self.lock:
            try:
                reply = request.connection.wait_reply(request.request_id, timeout)
            except (OSError, CoordinatorError) as error:
                raise OutcomeUnknownError(
                    f"lost the coordinator of {self.path} ({error}) after commit request {request.request_id} was "
                    f"sent: it may or may not have committed. Take a new snapshot to see whether its writes are "
                    f"there before running it again"
                ) from None
            if reply is None:
                return None
            if reply[0] == "error":
                raise error_from_reply(reply)
            if reply[0] == "conflict":
                raise _conflict(reply)  # (not bound to a local here: its traceback would hold this frame)
            seq: int = reply[1]
            if request.epoch == self.epoch:
                for index, ptr in reply[2]:
                    self.store.write_through(ptr, freeze(request.ops[index][2]))
            return seq

    # -- pinning snapshots ------------------------------------------------------------------

    def pin(self) -> Pin:
        """Take the latest root and pin it in our reader slot; unpin it with `unpin(seq, epoch, session.pid)`."""
        with self.lock:
            self.ensure_attached()
            control = self.control
            floor = min(self._held) if self._held else None
            while True:
                seq, root = control.read_root()
                if floor is not None and floor <= seq:
                    break  # an older pin of ours already protects this root
                control.set_reader_snapshot(self._slot, seq)
                full_fence()
                if control.read_root()[0] == seq:
                    break
            held = self._held
            held[seq] = held.get(seq, 0) + 1
            self._notice_compaction()
            return seq, self.store.root(root), self.epoch

    def adopt(self, instance_id: str, seq: int, root: int) -> Pin:
        """Pin (seq, root), a snapshot that another process of this database has pinned.

        For worker pools: the parent's pin keeps every atom of that root alive,
        so we only add our own pin (the coordinator then sees both) without
        re-reading the published root. CoordinatorRestartedError if the
        parent's pin is of another coordinator instance than ours (a restart
        in between): its pointers mean nothing here.
        """
        with self.lock:
            self.ensure_attached()
            if instance_id != self.instance_id:
                raise CoordinatorRestartedError(
                    f"the coordinator of {self.path} restarted during this pool call; run the call again"
                )
            floor = min(self._held) if self._held else None
            if floor is None or seq < floor:
                self.control.set_reader_snapshot(self._slot, seq)
            held = self._held
            held[seq] = held.get(seq, 0) + 1
            self._notice_compaction()
            return seq, self.store.root(root), self.epoch

    def unpin(self, seq: int, epoch: int, pinned_by: int) -> None:
        """Release one pin of `seq` taken in `epoch` by process `pinned_by`; the slot then holds the oldest pin left.

        A pin another process took is not ours to release: a forked child
        closing a snapshot it inherited must not release its own pin of the
        same seq (the parent's pin is in the parent's slot).
        """
        with self.lock:
            if self._control is None or pinned_by != self._pid or epoch != self.epoch:
                return  # a pin of the parent process, or of a coordinator instance that is gone
            held = self._held
            count = held.get(seq, 0) - 1  # one store below: interrupted before it, the pin is kept (never lost)
            if count > 0:
                held[seq] = count
            else:
                held.pop(seq, None)
            if not self._control.closed:
                self._control.set_reader_snapshot(self._slot, min(held) if held else None)

    def _notice_compaction(self) -> None:
        """After a compaction moved everything, drop the mappings of the old segments and the views into them.

        Only the bytes cache holds views into the mappings. The decoded objects
        of the old atoms age out of the object cache (a pointer is never
        reused, so none is ever read for a new atom): freeing them all at once
        took up to 16 ms of the next transaction.
        """
        oldest_segment = self.control.oldest_segment
        if oldest_segment != self._oldest_segment:
            self._oldest_segment = oldest_segment
            self.store.bytes.clear()  # first: a mapping with views still into it is unmapped only once they go
            self.store.reader.forget_below(oldest_segment)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"epoch {self.epoch}, instance {self.instance_id[:8]}"
        return f"<Session {self.path} {state}>"


_open_sessions: weakref.WeakSet[Session] = weakref.WeakSet()


def _detach_sessions_after_fork() -> None:
    for session in list(_open_sessions):
        if not session.closed:
            session.after_fork()


os.register_at_fork(after_in_child=_detach_sessions_after_fork)


def _conflict(reply: list[Any]) -> ConflictError:
    """The ConflictError of a "conflict" reply, logged."""
    conflict = ConflictError(tuple(reply[1]), reply[2], reply[3])
    log.debug("conflict: %s", conflict)
    return conflict
