"""The Database handle: one process's connection to one data directory.

Owns the client side of an instance: the connection to the coordinator, the
mapped control segment, this process's reader slot, the Store and its caches,
and the snapshots and transactions opened through it. Handles form a tree:
closing the database ends its transactions and snapshots.

Snapshot pinning follows the reader protocol of shm/control.py: the process's
slot holds the oldest snapshot any of its snapshots or transactions uses, so
the coordinator never unlinks memory one of them can reach.

A forked child cannot share its parent's connection or reader slot: the
first use of a Database in a child attaches it anew (with its own slot),
reusing the inherited read-only mappings and caches.
"""

from __future__ import annotations

import inspect
import logging
import os
import random
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

from protobase.client import launcher
from protobase.client.connection import Connection, Refusal, error_from_reply
from protobase.client.snapshot import Snapshot
from protobase.client.stats import DatabaseStats, ReaderStats, collect_stats
from protobase.client.transaction import Transaction
from protobase.core import codec
from protobase.core.arena import AtomReader
from protobase.core.datadir import FORMAT_VERSION, DataDir
from protobase.core.frozen import freeze
from protobase.core.store import DEFAULT_BYTES_CACHE, DEFAULT_OBJECT_CACHE, Store
from protobase.errors import (
    ConflictError,
    CoordinatorError,
    CoordinatorRestartedError,
    DatabaseClosedError,
    EncodingError,
    OutcomeUnknownError,
    ProtoBaseError,
)
from protobase.shm import names
from protobase.shm.control import ControlBlock, full_fence

__all__ = ["Database", "open", "Attempt"]

log = logging.getLogger("protobase")
T = TypeVar("T")
_open_databases: weakref.WeakSet = weakref.WeakSet()


DURABILITY_MODES = ("sync", "async")
ATTACH_TIMEOUT = 60.0  # seconds to keep retrying while a stopping coordinator gives way


def open(path: str | os.PathLike, *, durability: str = "sync", create: bool = True,
         start_coordinator: bool = True, shutdown_grace: float = 2.0, cache_size: int = DEFAULT_OBJECT_CACHE,
         flush_interval: float | None = None, checkpoint_bytes: int | None = None,
         compact_min_bytes: int | None = None, reader_slots: int | None = None) -> Database:
    """Open (and by default create) the database in directory `path`.

    The first open of a directory starts its coordinator; later opens, from
    any process of the same user, attach to it. The coordinator stops
    `shutdown_grace` seconds after the last database handle closes.

    `durability="sync"` (default): a commit returns once its write-ahead log
    record is fsynced (concurrent commits share one fsync); it is never lost.
    `"async"`: a commit returns once it is published in memory; the log is
    fsynced within `flush_interval` seconds (default 0.01), which bounds what a
    crash can lose, as Redis' `appendfsync everysec` does. `flush_interval`,
    `checkpoint_bytes` and `compact_min_bytes` configure a coordinator this
    call starts; a running one keeps its settings. So does `reader_slots`: how
    many processes may have the database open at once (default 1024).

    Raises DataDirectoryError for a bad directory (a file, another owner,
    loose permissions, another format version), CorruptionError when the
    log or checkpoint is damaged (run `protobase recover`), and
    CoordinatorError when no coordinator can be reached or started.
    """
    return Database(path, durability=durability, create=create, start_coordinator=start_coordinator,
                    shutdown_grace=shutdown_grace, cache_size=cache_size, flush_interval=flush_interval,
                    checkpoint_bytes=checkpoint_bytes, compact_min_bytes=compact_min_bytes,
                    reader_slots=reader_slots)


class Database:
    """A handle on one database; a context manager that closes it."""

    def __init__(self, path: str | os.PathLike, *, durability: str = "sync", create: bool = True,
                 start_coordinator: bool = True, shutdown_grace: float = 2.0,
                 cache_size: int = DEFAULT_OBJECT_CACHE, flush_interval: float | None = None,
                 checkpoint_bytes: int | None = None, compact_min_bytes: int | None = None,
                 reader_slots: int | None = None) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
        if reader_slots is not None and not (type(reader_slots) is int and 1 <= reader_slots < 2**32):
            raise ValueError(f"reader_slots must be a whole number from 1 to {2**32 - 1}, got {reader_slots!r}")
        self.durability = durability  # default durability of this handle's commits
        # An open that may not start a coordinator writes nothing: no coordinator can serve a
        # directory it would have to create (or stamp), so it fails on one before touching it.
        self.datadir = DataDir.open(path, create=create and start_coordinator)
        self.path = self.datadir.path
        self._launch = dict(start=start_coordinator, grace=shutdown_grace, compact_min_bytes=compact_min_bytes,
                            checkpoint_bytes=checkpoint_bytes, flush_interval=flush_interval,
                            reader_slots=reader_slots)
        self._cache_size = cache_size
        self._lock = threading.RLock()  # guards the connection and the pin counts
        self._held: Counter = Counter()  # {snapshot seq -> open snapshots and transactions on it}
        self._transactions: weakref.WeakSet = weakref.WeakSet()
        self._snapshots: weakref.WeakSet = weakref.WeakSet()
        self._closed = False
        self._connection: Connection | None = None
        self._control: ControlBlock | None = None
        self._store: Store | None = None
        self._epoch = 0  # bumped when we attach to a new coordinator instance: older pins are void
        self._attach()
        _open_databases.add(self)

    # -- attaching -----------------------------------------------------------------

    def _attach(self) -> None:
        """Connect to the coordinator (starting one if allowed) and map its control block.

        Also how a handle recovers: after an interrupted exchange broke the
        connection, or after the coordinator stopped or restarted. On the same
        instance our pins move to the new reader slot before the old slot is
        given up (with the old connection), so no snapshot of ours is
        unprotected for a moment; on a new instance they are void, and the
        snapshots and transactions that held them fail with
        CoordinatorRestartedError when next used.
        """
        deadline = time.monotonic() + ATTACH_TIMEOUT
        while True:
            connection = Connection(launcher.connect(self.datadir, **self._launch))
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
        try:
            instance_id, slot = reply[1], reply[2]
            if not names.is_instance_id(instance_id):
                raise CoordinatorError(f"coordinator sent a malformed instance id {instance_id!r}")
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
            self._epoch += 1
            self._held.clear()
            self._store = Store(AtomReader(self.instance_id), object_cache=self._cache_size,
                                bytes_cache=min(self._cache_size, DEFAULT_BYTES_CACHE))
        self._oldest_segment = self._control.oldest_segment

    def _detach(self) -> None:
        """Close our connection (the coordinator frees our reader slot) and unmap the control block."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._control is not None:
            self._control.close()
            self._control = None

    def _after_fork(self) -> None:
        # The parent's socket, slot and pins are the parent's; start our own.
        self._lock = threading.RLock()
        self._held = Counter()
        self._transactions = weakref.WeakSet()
        self._snapshots = weakref.WeakSet()
        if self._connection is not None:
            self._connection.close()  # our copy of the descriptor only: the parent's stays open
            self._connection = None
        self._control = None
        self._pid = os.getpid()

    def _ensure_attached(self) -> None:
        """Raise if closed; (re)attach if we have no connection, it broke, or the coordinator went away."""
        if self._closed:
            raise DatabaseClosedError(f"database {self.path} is closed; open it again with protobase.open()")
        if self._connection is None or not self._connection.peer_alive():
            self._attach()

    # -- talking to the coordinator ---------------------------------------------------

    def _exchange(self, connection: Connection, message: list) -> list:
        """One request and its reply; a reply of "error" is raised as the error it names."""
        try:
            reply = connection.request(message)
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
            f"kept as its durability mode promises; the next snapshot or transaction of this handle reconnects")

    def _request(self, message: list) -> list:
        with self._lock:
            self._ensure_attached()
            return self._exchange(self._connection, message)

    def _prepare_commit(self, epoch: int, base: int, serializable: bool, durability: str | None, ops: list,
                        reads: list, check_encodable: Callable[[list], None]) -> CommitRequest:
        """The commit request of a transaction, encoded; EncodingError names the user's path."""
        try:
            ops_bytes = codec.encode(ops)
        except EncodingError:
            check_encodable(ops)  # raises with the user's path
            raise
        message = ["commit", base, serializable, durability or self.durability, ops_bytes, reads]
        return CommitRequest(message, epoch, ops)

    def _send_commit(self, request: CommitRequest) -> None:
        """Send a commit request whole; raises, with nothing committed, if it cannot go out."""
        with self._lock:
            self._ensure_attached()
            if request.epoch != self._epoch:
                raise CoordinatorRestartedError(
                    f"the coordinator of {self.path} restarted while this transaction was open (it read "
                    f"snapshot {request.message[1]} of the previous instance); nothing was committed. Run it "
                    f"again: @db.transactional(retries=N) and db.attempts(retries=N) do")
            connection = request.connection = self._connection
            request.request_id = connection.reserve()
            try:
                connection.send(request.request_id, request.message)
            except OSError as error:
                raise self._lost(error, " Nothing was committed.") from None

    def _await_commit(self, request: CommitRequest, timeout: float | None = None) -> int | None:
        """The seq a sent commit committed as; None if no answer came within `timeout`.

        Raises ConflictError or the error the coordinator answered (nothing was
        committed), and OutcomeUnknownError when the connection was lost before
        the answer.
        """
        with self._lock:
            try:
                reply = request.connection.wait_reply(request.request_id, timeout)
            except (OSError, CoordinatorError) as error:
                raise OutcomeUnknownError(
                    f"lost the coordinator of {self.path} ({error}) after commit request {request.request_id} was "
                    f"sent: it may or may not have committed. Take a new snapshot to see whether its writes are "
                    f"there before running it again") from None
            if reply is None:
                return None
            if reply[0] == "error":
                raise error_from_reply(reply)
            if reply[0] == "conflict":
                error = ConflictError(tuple(reply[1]), reply[2], reply[3])
                log.debug("conflict: %s", error)
                raise error
            seq, pointers = reply[1], reply[2]
            if request.epoch == self._epoch:
                for index, ptr in pointers:
                    self._store.write_through(ptr, freeze(request.ops[index][2]))
            return seq

    # -- pinning snapshots ------------------------------------------------------------------

    def _pin(self) -> tuple[int, int, int]:
        """Take the latest root and pin it in our reader slot; return (seq, root pointer, epoch)."""
        with self._lock:
            self._ensure_attached()
            control = self._control
            floor = min(self._held) if self._held else None
            while True:
                seq, root = control.read_root()
                if floor is not None and floor <= seq:
                    break  # an older pin of ours already protects this root
                control.set_reader_snapshot(self._slot, seq)
                full_fence()
                if control.read_root()[0] == seq:
                    break
            self._held[seq] += 1
            self._notice_compaction()
            return seq, root, self._epoch

    def _notice_compaction(self) -> None:
        """After a compaction moved everything, drop the mappings and caches of the old segments."""
        oldest_segment = self._control.oldest_segment
        if oldest_segment != self._oldest_segment:
            self._oldest_segment = oldest_segment
            self._store.reader.forget_below(oldest_segment)
            self._store.clear()

    def _adopt_snapshot(self, instance_id: str, seq: int, root: int) -> Snapshot:
        """A snapshot of (seq, root) that another process of this database has pinned.

        For worker pools: the parent's pin keeps every atom of that root alive,
        so we only add our own pin (the coordinator then sees both) without
        re-reading the published root. CoordinatorRestartedError if the
        parent's pin is of another coordinator instance than ours (a restart
        in between): its pointers mean nothing here.
        """
        with self._lock:
            self._ensure_attached()
            if instance_id != self.instance_id:
                raise CoordinatorRestartedError(
                    f"the coordinator of {self.path} restarted during this pool call; run the call again")
            floor = min(self._held) if self._held else None
            if floor is None or seq < floor:
                self._control.set_reader_snapshot(self._slot, seq)
            self._held[seq] += 1
            self._notice_compaction()
            snapshot = Snapshot(self, seq, self._store.root(root), self._epoch)
        self._snapshots.add(snapshot)
        return snapshot

    def watch(self, *prefixes: Any) -> Any:
        """A Watcher of commits touching the key-path prefixes (all commits when none given).

        `for change in db.watch("carts"): ...` blocks until a commit writing under
        root["carts"] is published; `change.seq` says which. A prefix is a key of
        the root or a tuple of keys: ("carts", "u1").
        """
        from protobase.client.watch import Watcher

        self._ensure_attached()
        return Watcher(self, prefixes or [()])

    def pool(self, processes: int | None = None, *, context: str = "spawn") -> Any:
        """A pool of worker processes that all read the same snapshot per call; see protobase.client.pool."""
        from protobase.client.pool import Pool

        return Pool(self, processes, context=context)

    def _unpin(self, seq: int, epoch: int) -> None:
        with self._lock:
            if self._control is None or os.getpid() != self._pid or epoch != self._epoch:
                return  # a pin of the parent process, or of a coordinator instance that is gone
            self._held[seq] -= 1
            if self._held[seq] <= 0:
                del self._held[seq]
            if not self._control.closed:
                self._control.set_reader_snapshot(self._slot, min(self._held) if self._held else None)

    # -- public API ---------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """A read-only view of the latest commit, pinned until closed (use it in `with`)."""
        seq, root, epoch = self._pin()
        snapshot = Snapshot(self, seq, self._store.root(root), epoch)
        self._snapshots.add(snapshot)
        return snapshot

    def transaction(self, isolation: str = "snapshot", durability: str | None = None) -> Transaction:
        """A new transaction; use it in `with`, which commits on success and aborts on error.

        `isolation="snapshot"` (default) validates the keys written;
        `"serializable"` also validates the keys read, ruling out write skew.
        `durability` overrides the handle's default ("sync" or "async") for this commit.
        """
        if durability is not None and durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
        tx = Transaction(self, isolation, durability)
        self._transactions.add(tx)
        return tx

    def attempts(self, retries: int = 5, isolation: str = "snapshot", backoff: float = 0.001) -> Iterator[Attempt]:
        """Yield attempts until one commits: `for attempt in db.attempts(): with attempt as tx: ...`.

        A ConflictError ends an attempt and starts the next after a short
        randomised back-off; after `retries` retries the last one is raised.
        """
        for number in range(retries + 1):
            attempt = Attempt(self, isolation, last=number == retries)
            yield attempt
            if attempt.committed:
                return
            time.sleep(random.uniform(0, backoff * 2 ** min(number, 10)))

    def transactional(self, retries: int = 5,
                      isolation: str = "snapshot") -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: `f(*args)` runs `f(tx, *args)` in a transaction, re-run on conflict.

        The function runs to its end inside the transaction, so it must be a
        plain function: an `async def` (whose body would only run after the
        transaction committed, empty) is refused with TypeError.
        """

        def decorate(function: Callable[..., T]) -> Callable[..., T]:
            refusal = _ASYNC_HINT.format(name=getattr(function, "__qualname__", function))
            if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
                raise TypeError(refusal)

            @wraps(function)
            def run(*args: Any, **kwargs: Any) -> T:
                for attempt in self.attempts(retries, isolation):
                    with attempt as tx:
                        result = function(tx, *args, **kwargs)
                        if inspect.isawaitable(result):  # e.g. a partial of an async function
                            _close_awaitable(result)
                            raise TypeError(refusal)
                    if attempt.committed:
                        return result
                raise AssertionError("unreachable: the last attempt raises")

            return run

        return decorate

    def compact(self) -> int:
        """Ask the coordinator to compact now; return the sequence number of the compacted root."""
        return self._request(["compact"])[1]

    def backup(self, destination: str | os.PathLike) -> str:
        """Hot, consistent backup of the latest commit into the new directory `destination`.

        Commits go on meanwhile; the backup is the state at one commit. Returns
        the backup's checkpoint file; `protobase.open(destination)` opens it.
        """
        return self._request(["backup", os.path.abspath(os.fspath(destination))])[2]

    def checkpoint(self) -> int:
        """Ask for a checkpoint of the latest commit now (it is written in the background)."""
        return self._request(["checkpoint"])[1]

    def check(self) -> None:
        """Verify every structural invariant reachable from the latest root; CorruptionError if one fails."""
        from protobase.client.check import check_database

        with self.snapshot() as snapshot:
            check_database(self, snapshot)

    def stats(self) -> DatabaseStats:
        """Frozen statistics: segments, bytes, readers, sequence number, cache hit rates."""
        counters = self._request(["stats"])[1]
        return collect_stats(self, counters)

    def readers(self) -> list[ReaderStats]:
        return self.stats().readers

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def coordinator_pid(self) -> int:
        self._ensure_attached()
        return self._control.coordinator_pid

    def close(self) -> None:
        """End every transaction and snapshot of this handle, then detach. Idempotent."""
        if self._closed:
            return
        with self._lock:
            for tx in list(self._transactions):
                tx.abort()
            for snapshot in list(self._snapshots):
                snapshot.close()
            self._closed = True
            self._detach()
            if self._store is not None:
                self._store.clear()
                self._store.reader.close()
        _open_databases.discard(self)

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Database {self.path} {'closed' if self._closed else 'open'}>"


class Attempt:
    """One try of a retried transaction: a context manager that yields the transaction."""

    def __init__(self, db: Database, isolation: str, last: bool) -> None:
        self._db = db
        self._isolation = isolation
        self._last = last
        self.committed = False
        self.tx: Transaction | None = None

    def __enter__(self) -> Transaction:
        self.tx = self._db.transaction(self._isolation)
        return self.tx

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            try:
                self.tx.commit()
            except ProtoBaseError as error:
                if self._last or not error.retryable:
                    raise
                return False
            self.committed = True
            return False
        self.tx.abort()
        # swallow a retryable error raised by the body (a conflict of a nested
        # read-modify-write, a coordinator restart) unless it is the last try
        return issubclass(exc_type, ProtoBaseError) and exc_type.retryable and not self._last


_ASYNC_HINT = (
    "@db.transactional cannot run {name}: it is asynchronous, so its body would run after the transaction "
    "ended. Use a plain function, and call it from your event loop with "
    "`await loop.run_in_executor(None, function, ...)`")


def _close_awaitable(awaitable: Any) -> None:
    close = getattr(awaitable, "close", None)  # a coroutine never awaited warns unless closed
    if close is not None:
        close()


@dataclass
class CommitRequest:
    """A transaction's commit request, and once sent, where to collect its answer."""

    message: list  # the request, without its id
    epoch: int  # the handle's epoch of the transaction's snapshot
    ops: list  # the ops sent, for write-through
    connection: Connection | None = None  # the connection it goes out on: its reply comes back there
    request_id: int | None = None  # set just before it is sent

    def release(self) -> None:
        """Forget its answer, once the transaction has recorded it."""
        if self.connection is not None and self.request_id is not None:
            self.connection.release(self.request_id)

    @property
    def may_have_been_sent(self) -> bool:
        """False only if it certainly never reached the coordinator (interrupted before it went out)."""
        return (self.connection is not None and self.request_id is not None
                and self.connection.may_have_sent(self.request_id))


def _reattach_children_after_fork() -> None:
    for db in list(_open_databases):
        if not db._closed:
            db._after_fork()


os.register_at_fork(after_in_child=_reattach_children_after_fork)
