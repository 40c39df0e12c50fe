"""The Database handle: one process's connection to one data directory (the façade).

Owns what the user holds: the handle, its options, and the snapshots and
transactions opened through it. Handles form a tree: closing the database
ends its transactions and snapshots, then its session. Runs in client
processes.

The attachment itself (the connection to the coordinator, the mapped control
block, this process's reader slot and pins, the Store and its caches, sending
and collecting commits) is the handle's `session` (protobase/client/session.py),
through which snapshots, transactions, the pool, stats and check work.

A forked child cannot share its parent's connection or reader slot: the
first use of a Database in a child attaches it anew (with its own slot),
reusing the inherited read-only mappings and caches.
"""

from __future__ import annotations

import inspect
import os
import random
import time
import weakref
from collections.abc import Callable, Iterator
from functools import wraps
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, overload

from protobase.client.session import Launch, Session
from protobase.client.snapshot import Snapshot
from protobase.client.stats import DatabaseStats, ReaderStats, collect_stats
from protobase.client.transaction import Isolation, Transaction
from protobase.core.datadir import DataDir
from protobase.core.store import DEFAULT_OBJECT_CACHE
from protobase.errors import ConflictError, ProtoBaseError
from protobase.settings import DEFAULTS, Settings
from protobase.wire.verbs import DURABILITY_MODES, Durability

if TYPE_CHECKING:
    from protobase.client.pool import Pool
    from protobase.client.watch import Watcher

__all__ = ["Database", "open", "Attempt"]

MAX_BACKOFF = 0.005  # seconds a retry waits at most (attempts): bounded, unlike 2**n
VISIBLE_WAIT = 1.0  # seconds a retry waits at most for the commit it lost to to be published
VISIBLE_POLL = 0.0001  # seconds between two looks at the published root meanwhile

P = ParamSpec("P")
R = TypeVar("R")
_open_databases: weakref.WeakSet[Database] = weakref.WeakSet()


def open(
    path: str | os.PathLike[str],
    *,
    durability: Durability = "sync",
    create: bool = True,
    start_coordinator: bool = True,
    shutdown_grace: float = 2.0,
    cache_size: int = DEFAULT_OBJECT_CACHE,
    flush_interval: float | None = None,
    checkpoint_bytes: int | None = None,
    compact_min_bytes: int | None = None,
    reader_slots: int | None = None,
    busy_poll: float | None = None,
) -> Database:
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

    `busy_poll` (seconds, default 0.0005): how long this handle polls for a
    reply before it sleeps on the socket, and the same for a coordinator
    this call starts. A reply taken while polling spares the kernel a
    wake-up, which costs more than a commit on a virtual machine; polling
    yields the CPU to any process that wants it, and stops by itself when
    replies come slowly. 0 never polls.

    Raises DataDirectoryError for a bad directory (a file, another owner,
    loose permissions, another format version), CorruptionError when the
    log or checkpoint is damaged (run `protobase recover`), and
    CoordinatorError when no coordinator can be reached or started.
    """
    return Database(
        path,
        durability=durability,
        create=create,
        start_coordinator=start_coordinator,
        shutdown_grace=shutdown_grace,
        cache_size=cache_size,
        flush_interval=flush_interval,
        checkpoint_bytes=checkpoint_bytes,
        compact_min_bytes=compact_min_bytes,
        reader_slots=reader_slots,
        busy_poll=busy_poll,
    )


class Database:
    """A handle on one database; a context manager that closes it."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "sync",
        create: bool = True,
        start_coordinator: bool = True,
        shutdown_grace: float = 2.0,
        cache_size: int = DEFAULT_OBJECT_CACHE,
        flush_interval: float | None = None,
        checkpoint_bytes: int | None = None,
        compact_min_bytes: int | None = None,
        reader_slots: int | None = None,
        busy_poll: float | None = None,
    ) -> None:
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
        # Checked here, where the caller passed them, rather than by a coordinator's command line.
        Settings(
            shutdown_grace=shutdown_grace,
            flush_interval=DEFAULTS.flush_interval if flush_interval is None else flush_interval,
            checkpoint_bytes=DEFAULTS.checkpoint_bytes if checkpoint_bytes is None else checkpoint_bytes,
            compact_min_bytes=DEFAULTS.compact_min_bytes if compact_min_bytes is None else compact_min_bytes,
            reader_slots=DEFAULTS.reader_slots if reader_slots is None else reader_slots,
            busy_poll=DEFAULTS.busy_poll if busy_poll is None else busy_poll,
        )
        # An open that may not start a coordinator writes nothing: no coordinator can serve a
        # directory it would have to create (or stamp), so it fails on one before touching it.
        self.datadir = DataDir.open(path, create=create and start_coordinator)
        self.path = self.datadir.path
        launch = Launch(
            start=start_coordinator,
            grace=shutdown_grace,
            flush_interval=flush_interval,
            checkpoint_bytes=checkpoint_bytes,
            compact_min_bytes=compact_min_bytes,
            reader_slots=reader_slots,
            busy_poll=busy_poll,
        )
        #: The attachment to the coordinator (connection, reader slot, pins, store, commits): the
        #: internal interface the client modules use. Not for applications.
        self.session = Session(self.datadir, launch, durability=durability, cache_size=cache_size)
        self._transactions: weakref.WeakSet[Transaction] = weakref.WeakSet()  # closing the handle aborts them
        self._snapshots: weakref.WeakSet[Snapshot] = weakref.WeakSet()  # closing the handle closes them
        _open_databases.add(self)

    @property
    def durability(self) -> Durability:
        """The default durability of this handle's commits ("sync" or "async")."""
        return self.session.durability

    @durability.setter
    def durability(self, value: Durability) -> None:
        self.session.durability = value

    @property
    def instance_id(self) -> str:
        """The id of the coordinator instance this handle is attached to."""
        return self.session.instance_id

    def _after_fork(self) -> None:
        # The parent's transactions and snapshots are the parent's (the session detaches itself).
        self._transactions = weakref.WeakSet()
        self._snapshots = weakref.WeakSet()

    def watch(self, *prefixes: Any) -> Watcher:
        """A Watcher of commits touching the key-path prefixes (all commits when none given).

        `for change in db.watch("carts"): ...` blocks until a commit writing under
        root["carts"] is published; `change.seq` says which. A prefix is a key of
        the root or a tuple of keys: ("carts", "u1").
        """
        from protobase.client.watch import Watcher

        self.session.ensure_attached()
        return Watcher(self.datadir, prefixes or [()])

    def pool(self, processes: int | None = None, *, context: str = "spawn") -> Pool:
        """A pool of worker processes that all read the same snapshot per call; see protobase.client.pool."""
        from protobase.client.pool import Pool

        return Pool(self, processes, context=context)

    # -- public API ---------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """A read-only view of the latest commit, pinned until closed (use it in `with`)."""
        snapshot = Snapshot(self.session, *self.session.pin())
        self._snapshots.add(snapshot)
        return snapshot

    def transaction(self, isolation: Isolation = "snapshot", durability: Durability | None = None) -> Transaction:
        """A new transaction; use it in `with`, which commits on success and aborts on error.

        `isolation="snapshot"` (default) validates the keys written;
        `"serializable"` also validates the keys read, ruling out write skew.
        `durability` overrides the handle's default ("sync" or "async") for this commit.
        """
        if durability is not None and durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
        tx = Transaction(self.session, isolation, durability)
        self._transactions.add(tx)
        return tx

    def attempts(
        self,
        retries: int = 5,
        isolation: Isolation = "snapshot",
        backoff: float = 0.001,
        max_backoff: float = MAX_BACKOFF,
    ) -> Iterator[Attempt]:
        """Yield attempts until one commits: `for attempt in db.attempts(): with attempt as tx: ...`.

        A ConflictError ends an attempt; after `retries` retries the last one
        is raised. The next attempt starts once the commit it lost to is
        visible (a snapshot taken before would lose again, for nothing). After
        the first conflict it also waits a random while of up to `backoff`
        seconds (jitter, so that the losers do not collide again); after a
        second conflict in a row it does not: the coordinator answers that
        one when the client's turn at the key path starts (coordinator/
        conflicts.py, Reservations), and a sleep then would only hold up the
        clients queued behind it. So no transaction starves, and none sleeps
        long. Other retryable errors (a coordinator restart) back off up to
        `backoff * 2**n` seconds at the n-th retry, never more than
        `max_backoff`. Counters that many transactions bump are best written
        with `incr`, which never conflicts.
        """
        for number in range(retries + 1):
            attempt = Attempt(self, isolation, last=number == retries)
            yield attempt
            if attempt.committed:
                return
            if attempt.lost_to is None:
                time.sleep(random.uniform(0, min(backoff * 2**number, max_backoff)))
                continue
            self._wait_until_visible(attempt.lost_to)
            if number == 0:
                time.sleep(random.uniform(0, min(backoff, max_backoff)))

    def _wait_until_visible(self, seq: int) -> None:
        """Wait (a bounded while) until commit `seq` is published: a "sync" one only is once durable."""
        deadline = time.monotonic() + VISIBLE_WAIT
        try:
            control = self.session.control
            while control.read_root()[0] < seq and time.monotonic() < deadline:
                time.sleep(VISIBLE_POLL)
        except ProtoBaseError:  # detached or closed meanwhile: the next attempt says what happened
            pass

    @overload
    def transactional(self, function: Callable[Concatenate[Transaction, P], R], /) -> Callable[P, R]: ...

    @overload
    def transactional(
        self, retries: int = 5, isolation: Isolation = "snapshot"
    ) -> Callable[[Callable[Concatenate[Transaction, P], R]], Callable[P, R]]: ...

    def transactional(self, retries: int | Callable[..., Any] = 5, isolation: Isolation = "snapshot") -> Any:
        """Decorator: `f(*args)` runs `f(tx, *args)` in a transaction, re-run on conflict.

        `@db.transactional` retries 5 times; `@db.transactional(retries=N,
        isolation=...)` says how often and how. The decorated function keeps
        `f`'s parameters after `tx`, and its return type, for a type checker.

        The function runs to its end inside the transaction, so it must be a
        plain function: an `async def` (whose body would only run after the
        transaction committed, empty) is refused with TypeError.
        """
        if callable(retries):  # @db.transactional, without arguments
            return self._retried(retries, 5, isolation)
        count = retries
        return lambda function: self._retried(function, count, isolation)

    def _retried(
        self, function: Callable[Concatenate[Transaction, P], R], retries: int, isolation: Isolation
    ) -> Callable[P, R]:
        """`function` run by `transactional`: in attempts until one commits."""
        refusal = _ASYNC_HINT.format(name=getattr(function, "__qualname__", function))
        if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
            raise TypeError(refusal)

        @wraps(function)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
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

    def compact(self) -> int:
        """Ask the coordinator to compact now; return the sequence number of the compacted root."""
        seq: int = self.session.request(["compact"])[1]
        return seq

    def backup(self, destination: str | os.PathLike[str]) -> str:
        """Hot, consistent backup of the latest commit into the new directory `destination`.

        Commits go on meanwhile; the backup is the state at one commit. Returns
        the backup's checkpoint file; `protobase.open(destination)` opens it.
        """
        checkpoint_file: str = self.session.request(["backup", os.path.abspath(os.fspath(destination))])[2]
        return checkpoint_file

    def checkpoint(self) -> int:
        """Ask for a checkpoint of the latest commit now (it is written in the background)."""
        seq: int = self.session.request(["checkpoint"])[1]
        return seq

    def check(self) -> None:
        """Verify every structural invariant reachable from the latest root; CorruptionError if one fails."""
        from protobase.client.check import check_database

        with self.snapshot() as snapshot:
            check_database(self.session, snapshot)

    def stats(self) -> DatabaseStats:
        """Frozen statistics: segments, bytes, readers, sequence number, cache hit rates."""
        counters = self.session.request(["stats"])[1]
        return collect_stats(self.session, counters)

    def readers(self) -> tuple[ReaderStats, ...]:
        """The reader table: one record per process attached (`stats().readers`)."""
        return self.stats().readers

    @property
    def closed(self) -> bool:
        return self.session.closed

    @property
    def coordinator_pid(self) -> int:
        self.session.ensure_attached()
        return self.session.control.coordinator_pid

    def close(self) -> None:
        """End every transaction and snapshot of this handle, then detach. Idempotent."""
        session = self.session
        if session.closed:
            return
        with session.lock:
            for tx in list(self._transactions):
                tx.abort()
            for snapshot in list(self._snapshots):
                snapshot.close()
            session.close()
        _open_databases.discard(self)

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Database {self.path} {'closed' if self.closed else 'open'}>"


class Attempt:
    """One try of a retried transaction: a context manager that yields the transaction."""

    def __init__(self, db: Database, isolation: Isolation, last: bool) -> None:
        self._db = db
        self._isolation = isolation
        self._last = last
        self.committed = False
        self.tx: Transaction | None = None
        self.lost_to: int | None = None  # the seq of the commit a conflict of this attempt lost to

    def __enter__(self) -> Transaction:
        self.tx = self._db.transaction(self._isolation)
        return self.tx

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        assert self.tx is not None, "an Attempt is used in `with`"
        if exc_type is None:
            try:
                self.tx.commit()
            except ProtoBaseError as error:
                if self._last or not error.retryable:
                    raise
                self._note_conflict(error)
                return False
            self.committed = True
            return False
        self.tx.abort()
        if isinstance(exc, ProtoBaseError):
            self._note_conflict(exc)
        # swallow a retryable error raised by the body (a conflict of a nested
        # read-modify-write, a coordinator restart) unless it is the last try
        return issubclass(exc_type, ProtoBaseError) and exc_type.retryable and not self._last

    def _note_conflict(self, error: ProtoBaseError) -> None:
        if isinstance(error, ConflictError) and type(error.conflicting_seq) is int:
            self.lost_to = error.conflicting_seq


_ASYNC_HINT = (
    "@db.transactional cannot run {name}: it is asynchronous, so its body would run after the transaction "
    "ended. Use a plain function, and call it from your event loop with "
    "`await loop.run_in_executor(None, function, ...)`"
)


def _close_awaitable(awaitable: Any) -> None:
    close = getattr(awaitable, "close", None)  # a coroutine never awaited warns unless closed
    if close is not None:
        close()


def _forget_children_after_fork() -> None:
    for db in list(_open_databases):
        if not db.closed:
            db._after_fork()


os.register_at_fork(after_in_child=_forget_children_after_fork)
