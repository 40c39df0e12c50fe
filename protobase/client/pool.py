"""The worker pool: parallel work over one consistent snapshot, in many processes.

Owns the pool's worker processes and how work reaches them. Each `map` call
pins one snapshot in the calling process and hands its (seq, root pointer) to
every task, so every item of the call is read from the same commit while
other processes keep committing. Workers attach to the database themselves
and read records straight from shared memory: only the items (usually keys)
and the results are pickled, never the data set.

Each worker has its own pipe, so the pool knows which task a worker holds:
an exception in a task reaches the caller with the worker's traceback, and a
worker that dies (killed, crashed) is reported as WorkerDiedError and
replaced; a call never hangs on a dead worker. `func` must be picklable
(a module-level function) under the default "spawn" start method.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sized
from multiprocessing.connection import wait
from typing import Any, Protocol, TypeVar

from protobase.client.session import Launch, Session
from protobase.client.snapshot import Snapshot
from protobase.core.arena import DICT_LEAF
from protobase.core.datadir import DataDir
from protobase.errors import DatabaseClosedError, ProtoBaseError, WorkerDiedError

__all__ = ["Pool", "WorkerDiedError", "RemoteTraceback", "chunk_sizes"]

READY = "ready"  # a worker's first message: it has attached to the database
START_TIMEOUT = 120.0  # seconds a worker may take to start and attach (a loaded host, a cold import)
MAX_CHUNK = 10_000  # items per task at most: bounds a task's pickled size and the tail of a call

T = TypeVar("T")  # an item of the iterable a call maps over
R = TypeVar("R")  # what the function returns for one item

#: What a task works on: ("items", [item, ...]), or ("keys", path, start, stop): positions in a collection.
Work = tuple[Any, ...]
#: A worker's answer to a task: ("ok", task id, [result, ...]) or ("error", task id, (exception, traceback text)).
Reply = tuple[str, int, Any]


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a pool worker (set as the error's __cause__)."""

    def __str__(self) -> str:
        return str(self.args[0])


class SnapshotSource(Protocol):
    """What a pool needs of its database (a Database): where it is, and pinned snapshots of it."""

    @property
    def path(self) -> str: ...

    @property
    def instance_id(self) -> str: ...

    def snapshot(self) -> Snapshot: ...


def _worker_main(path: str, conn: Any) -> None:
    """A worker: attach, say it is ready, then run tasks until told to stop (None).

    It needs no Database: it only adopts the snapshots its caller pinned, in a
    session of its own (as `protobase.open(path, create=False)` would attach).
    """
    session = Session(DataDir.open(path, create=False), Launch())
    snapshot: Snapshot | None = None
    try:
        conn.send(READY)
        while True:
            message = conn.recv()
            if message is None:
                return
            task_id, instance_id, seq, root, func, work = message
            if snapshot is None or snapshot.seq != seq or session.instance_id != instance_id:
                if snapshot is not None:
                    snapshot.close()
                    snapshot = None
                try:
                    snapshot = Snapshot(session, *session.adopt(instance_id, seq, root))
                except ProtoBaseError as error:
                    conn.send(("error", task_id, (error, traceback.format_exc())))
                    continue
            conn.send(_run_task(task_id, session, snapshot, func, work))
    except (EOFError, KeyboardInterrupt):
        return
    finally:
        if snapshot is not None:
            snapshot.close()
        session.close()


def _run_task(
    task_id: int, session: Session, snapshot: Snapshot, func: Callable[[Snapshot, Any], Any], work: Work
) -> Reply:
    try:
        items = _items(session, snapshot, work)
        return ("ok", task_id, [func(snapshot, item) for item in items])
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the caller
        text = traceback.format_exc()
        try:
            import pickle

            pickle.dumps(error)
        except Exception:
            error = RuntimeError(f"{type(error).__name__}: {error}")
        return ("error", task_id, (error, text))


def _items(session: Session, snapshot: Snapshot, work: Work) -> Iterable[Any]:
    if work[0] == "items":
        items: list[Any] = work[1]
        return items
    _, path, start, stop = work  # ("keys", path, start, stop): positions in a collection
    collection = _resolve(snapshot, path)
    ptr = getattr(collection, "ptr", None)
    if ptr is not None:
        return list(session.store.access.keys_at(ptr, DICT_LEAF, start, stop)) if ptr else []
    return list(collection)[start:stop]


def _resolve(snapshot: Snapshot, path: tuple[Any, ...]) -> Any:
    value: Any = snapshot.root
    for key in path:
        value = value[key]
    return value


class _Worker:
    def __init__(self, context: Any, path: str) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_worker_main, args=(path, child), daemon=True, name="protobase-pool-worker"
        )
        self.process.start()
        child.close()
        self.task: int | None = None  # the task it holds
        self.ready = False  # it has said it attached

    def wait_ready(self, deadline: float) -> None:
        """Return once the worker has attached; WorkerDiedError if it exits or hangs first."""
        if self.ready:
            return
        if wait([self.conn, self.process.sentinel], max(0.0, deadline - time.monotonic())) and self.conn.poll():
            try:
                self.ready = self.conn.recv() == READY
            except (EOFError, OSError):
                pass
        if not self.ready:
            self.process.join(timeout=1.0)
            raise WorkerDiedError(_start_failure(self.process.pid, self.process.exitcode))

    def stop(self, timeout: float = 10.0) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def _start_failure(pid: int | None, exitcode: int | None) -> str:
    return (
        f"pool worker {pid} did not start (exit code {exitcode}; its error is on standard error). "
        f"The usual cause: with the 'spawn' start method every worker imports the main script again, so "
        f'a script that opens the pool must do so under `if __name__ == "__main__":`'
    )


def _refuse_while_bootstrapping() -> None:
    # A spawned child is importing the main script again: a pool here would spawn
    # workers of its own, recursively. multiprocessing's own error says less.
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(
            "db.pool() was called while this process was starting as a pool worker: the main "
            "script runs again in every worker under the 'spawn' start method. Put the code that "
            'opens the pool under `if __name__ == "__main__":`'
        )


def chunk_sizes(count: int | None, processes: int) -> Iterator[int]:
    """Items per task for `count` items on `processes` workers (None: a count not known in advance).

    About four tasks per worker, so that all of them start at once and a slow
    task leaves little tail; with an unknown count, tasks grow from 1 item by
    doubling up to 64, so a few items still spread over every worker.
    """
    if count is not None:
        size = max(1, min(MAX_CHUNK, -(-count // (4 * processes))))
        return itertools.repeat(size)
    return itertools.chain((1 << step for step in range(6)), itertools.repeat(64))


class Pool:
    """`with db.pool(processes=N) as pool:` N worker processes attached to the database."""

    def __init__(self, db: SnapshotSource, processes: int | None = None, *, context: str = "spawn") -> None:
        count = processes or os.cpu_count() or 1
        if count < 1:
            raise ValueError(f"a pool needs at least one process, got {processes}")
        _refuse_while_bootstrapping()
        self._db = db
        self._context = multiprocessing.get_context(context)
        self._workers = [_Worker(self._context, db.path) for _ in range(count)]
        self._closed = False
        self.replaced = 0  # workers that died and were replaced
        deadline = time.monotonic() + START_TIMEOUT
        try:
            for worker in self._workers:
                worker.wait_ready(deadline)
        except BaseException:
            self.close()
            raise

    @property
    def processes(self) -> int:
        return len(self._workers)

    def map(self, func: Callable[[Snapshot, T], R], iterable: Iterable[T], chunksize: int | None = None) -> list[R]:
        """[func(snapshot, item) for item in iterable], in N processes, one snapshot for all items.

        Items go to the workers `chunksize` at a time; by default the size
        comes from the item count (see `chunk_sizes`), so even a few items
        spread over every worker.
        """
        return list(self.imap(func, iterable, chunksize))

    def imap(
        self, func: Callable[[Snapshot, T], R], iterable: Iterable[T], chunksize: int | None = None
    ) -> Iterator[R]:
        """Like map, lazily and in order."""
        if chunksize is not None and chunksize < 1:
            raise ValueError(f"chunksize must be at least 1, got {chunksize}")
        count = len(iterable) if isinstance(iterable, Sized) else None
        sizes = itertools.repeat(chunksize) if chunksize else chunk_sizes(count, self.processes)
        chunks = (("items", chunk) for chunk in _chunked(iterable, sizes))
        return self._results(func, chunks)

    def map_keys(self, func: Callable[[Snapshot, Any], R], path: Any, chunksize: int | None = None) -> list[R]:
        """[func(snapshot, key) for key in the collection at `path`], split by position across workers.

        Workers read the keys themselves from the snapshot: nothing but
        positions is sent to them. `path` is a top-level key or a tuple of keys.
        """
        path = path if isinstance(path, tuple) else (path,)
        with self._db.snapshot() as snapshot:
            total = len(_resolve(snapshot, path))
            size = chunksize or next(chunk_sizes(total, self.processes))
            work = (("keys", path, start, min(total, start + size)) for start in range(0, total, size))
            return list(self._run(func, snapshot, work))

    def _results(self, func: Callable[[Snapshot, Any], R], work: Iterator[Work]) -> Iterator[R]:
        with self._db.snapshot() as snapshot:  # pinned for the whole call
            yield from self._run(func, snapshot, work)

    def _run(self, func: Callable[[Snapshot, Any], R], snapshot: Snapshot, work: Iterator[Work]) -> Iterator[R]:
        if self._closed:
            raise DatabaseClosedError("this pool is closed; create another with db.pool()")
        seq, root, instance_id = snapshot.seq, snapshot.root.ptr, self._db.instance_id
        ids = itertools.count()
        done: dict[int, list[Any]] = {}  # {task id -> results}, waiting to be yielded in order
        next_out = 0
        exhausted = False
        try:
            while True:
                for worker in self._workers:
                    if worker.task is None and not exhausted:
                        item = next(work, None)
                        if item is None:
                            exhausted = True
                            break
                        worker.wait_ready(time.monotonic() + START_TIMEOUT)  # a replacement may be starting
                        worker.task = next(ids)
                        worker.conn.send((worker.task, instance_id, seq, root, func, item))
                busy = [worker for worker in self._workers if worker.task is not None]
                if not busy:
                    break
                self._collect(busy, done)
                while next_out in done:
                    yield from done.pop(next_out)
                    next_out += 1
        finally:
            self._drain()
        while next_out in done:
            yield from done.pop(next_out)
            next_out += 1

    def _collect(self, busy: list[_Worker], done: dict[int, list[Any]]) -> None:
        ready = wait([worker.conn for worker in busy] + [worker.process.sentinel for worker in busy])
        for worker in busy:
            if worker.conn in ready:
                try:
                    status, task, payload = worker.conn.recv()
                except (EOFError, OSError):
                    self._replace(worker)  # it died mid-send
                    continue
                worker.task = None
                if status == "error":
                    error, text = payload
                    raise error from RemoteTraceback(f"\n\nin pool worker {worker.process.pid}:\n{text}")
                done[task] = payload
            elif worker.process.sentinel in ready:
                self._replace(worker)

    def _replace(self, worker: _Worker) -> None:
        worker.process.join(timeout=10)  # its pipe can close before it is reaped
        code = worker.process.exitcode
        pid = worker.process.pid
        worker.conn.close()

        index = self._workers.index(worker)
        self._workers[index] = _Worker(self._context, self._db.path)
        self.replaced += 1
        raise WorkerDiedError(
            f"pool worker {pid} died (exit code {code}) while running a task; it was "
            f"replaced by {self._workers[index].process.pid} and this call failed: run it again"
        )

    def _drain(self) -> None:
        """After a failure, wait for the other workers' tasks so the next call starts clean."""
        for worker in self._workers:
            if worker.task is None:
                continue
            while True:
                ready = wait([worker.conn, worker.process.sentinel])
                if worker.conn in ready:
                    try:
                        worker.conn.recv()
                    except (EOFError, OSError):
                        pass
                    break
                if not worker.process.is_alive():
                    index = self._workers.index(worker)
                    worker.conn.close()
                    self._workers[index] = _Worker(self._context, self._db.path)
                    self.replaced += 1
                    break
            worker.task = None

    def close(self) -> None:
        """Stop every worker (they detach cleanly). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for worker in self._workers:
            worker.stop()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Pool {len(self._workers)} processes {'closed' if self._closed else 'open'}>"


def _chunked(iterable: Iterable[T], sizes: Iterator[int]) -> Iterator[list[T]]:
    iterator = iter(iterable)
    for size in sizes:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk
