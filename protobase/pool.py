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
import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

from .errors import DatabaseClosedError, ProtoBaseError

if TYPE_CHECKING:
    from .database import Database
    from .snapshot import Snapshot

__all__ = ["Pool", "WorkerDiedError", "RemoteTraceback"]


class WorkerDiedError(ProtoBaseError):
    """A pool worker died while it held a task; it has been replaced, the call failed."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a pool worker (set as the error's __cause__)."""

    def __str__(self) -> str:
        return self.args[0]


def _worker_main(path: str, conn: Any) -> None:
    """A worker: attach, then run tasks until told to stop (None)."""
    import protobase

    db = protobase.open(path, create=False)
    snapshot: Snapshot | None = None
    try:
        while True:
            message = conn.recv()
            if message is None:
                return
            task_id, seq, root, func, work = message
            if snapshot is None or snapshot.seq != seq:
                if snapshot is not None:
                    snapshot.close()
                snapshot = db._adopt_snapshot(seq, root)
            conn.send(_run_task(task_id, snapshot, func, work))
    except (EOFError, KeyboardInterrupt):
        return
    finally:
        db.close()


def _run_task(task_id: int, snapshot: Snapshot, func: Callable, work: tuple) -> tuple:
    try:
        items = _items(snapshot, work)
        return ("ok", task_id, [func(snapshot, item) for item in items])
    except BaseException as error:  # noqa: BLE001 - every failure goes back to the caller
        text = traceback.format_exc()
        try:
            import pickle

            pickle.dumps(error)
        except Exception:
            error = RuntimeError(f"{type(error).__name__}: {error}")
        return ("error", task_id, (error, text))


def _items(snapshot: Snapshot, work: tuple) -> Iterable[Any]:
    if work[0] == "items":
        return work[1]
    _, path, start, stop = work  # ("keys", path, start, stop): positions in a collection
    collection = _resolve(snapshot, path)
    ptr = getattr(collection, "ptr", None)
    if ptr is not None:
        from .arena import DICT_LEAF

        return list(snapshot._db._store.access.keys_at(ptr, DICT_LEAF, start, stop)) if ptr else []
    return list(collection)[start:stop]


def _resolve(snapshot: Snapshot, path: tuple) -> Any:
    value = snapshot.root
    for key in path:
        value = value[key]
    return value


class _Worker:
    def __init__(self, context: Any, path: str) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(path, child), daemon=True,
                                       name="protobase-pool-worker")
        self.process.start()
        child.close()
        self.task: int | None = None  # the task it holds

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


class Pool:
    """`with db.pool(processes=N) as pool:` N worker processes attached to the database."""

    def __init__(self, db: Database, processes: int | None = None, *, context: str = "spawn") -> None:
        count = processes or os.cpu_count() or 1
        if count < 1:
            raise ValueError(f"a pool needs at least one process, got {processes}")
        self._db = db
        self._context = multiprocessing.get_context(context)
        self._workers = [_Worker(self._context, db.path) for _ in range(count)]
        self._closed = False
        self.replaced = 0  # workers that died and were replaced

    @property
    def processes(self) -> int:
        return len(self._workers)

    def map(self, func: Callable[[Snapshot, Any], Any], iterable: Iterable[Any], chunksize: int | None = None) -> list:
        """[func(snapshot, item) for item in iterable], in N processes, one snapshot for all items."""
        return list(self.imap(func, iterable, chunksize))

    def imap(self, func: Callable[[Snapshot, Any], Any], iterable: Iterable[Any],
             chunksize: int | None = None) -> Iterator[Any]:
        """Like map, lazily and in order."""
        size = chunksize or 64
        chunks = (("items", chunk) for chunk in _chunked(iterable, size))
        return self._results(func, chunks)

    def map_keys(self, func: Callable[[Snapshot, Any], Any], path: str | tuple,
                 chunksize: int | None = None) -> list:
        """[func(snapshot, key) for key in the collection at `path`], split by position across workers.

        Workers read the keys themselves from the snapshot: nothing but
        positions is sent to them. `path` is a top-level key or a tuple of keys.
        """
        path = path if isinstance(path, tuple) else (path,)
        with self._db.snapshot() as snapshot:
            total = len(_resolve(snapshot, path))
            size = chunksize or max(1, min(10_000, -(-total // (4 * self.processes))))
            work = (("keys", path, start, min(total, start + size)) for start in range(0, total, size))
            return list(self._run(func, snapshot, work))

    def _results(self, func: Callable, work: Iterator[tuple]) -> Iterator[Any]:
        with self._db.snapshot() as snapshot:  # pinned for the whole call
            yield from self._run(func, snapshot, work)

    def _run(self, func: Callable, snapshot: Snapshot, work: Iterator[tuple]) -> Iterator[Any]:
        if self._closed:
            raise DatabaseClosedError("this pool is closed; create another with db.pool()")
        seq, root = snapshot.seq, snapshot.root.ptr
        ids = itertools.count()
        done: dict[int, list] = {}  # {task id -> results}, waiting to be yielded in order
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
                        worker.task = next(ids)
                        worker.conn.send((worker.task, seq, root, func, item))
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

    def _collect(self, busy: list[_Worker], done: dict[int, list]) -> None:
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
        raise WorkerDiedError(f"pool worker {pid} died (exit code {code}) while running a task; it was "
                              f"replaced by {self._workers[index].process.pid} and this call failed: run it again")

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


def _chunked(iterable: Iterable[Any], size: int) -> Iterator[list]:
    iterator = iter(iterable)
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield chunk
