"""The durability benchmark: `python -m benchmarks.durability [--records N] [--no-doc]`.

Measures, in one run, every number as a ratio against a reference measured in
the same run on the same filesystem (a private temporary directory under /tmp):

1. durable single-key commits/s: ProtoBase `durability="sync"` with one client
   and with two clients in two processes at once (aggregate), against SQLite
   in WAL mode with `PRAGMA synchronous=FULL`, one connection per process, one
   `INSERT OR REPLACE` per transaction, 1 and 2 processes. Targets: ProtoBase
   1 client >= SQLite 1 client; ProtoBase 2 clients >= 2x SQLite 2 clients
   (group commit). Commit latency p50/p99 for each. The floor of the disk is
   measured beside them: a loop of a small write plus `fdatasync`, appending
   (as the WAL does) and overwriting a preallocated file;
2. `durability="async"` commits/s against sync, one client: target >= 10x;
3. recovery of a database of `--records` records `{"id", "name", "score",
   "tags"}` (loaded in transactions of 10,000): the time of `protobase.open`
   until the first snapshot read works, (a) after a clean shutdown (final
   checkpoint, nothing to replay), (b) after `kill -9` of the coordinator
   following extra commits that are only in the WAL (checkpoint + replay). An
   open of an empty database is the reference (process start-up);
4. WAL bytes per commit (growth of the wal-*.log files / commits) for a
   single-key and a 10-key commit, beside SQLite's WAL growth for the same
   commits (`wal_autocheckpoint=0`).

Commit rounds run in worker processes (spawned), all the clients of a round
released at once; rounds of the different stores are interleaved and rotated
repeat by repeat; rates are medians of the repeats, ratios medians of the
per-repeat ratios. Nothing is asserted. The report is a markdown table,
printed and written into docs/performance-durability.md between
`<!-- durability:begin -->` and `<!-- durability:end -->`. When a target is
missed (or with `--profile`), a cProfile of a ProtoBase client and of a
coordinator run under `python -m cProfile` is printed.

Everything this starts is stopped before it returns: databases closed, their
coordinators (and persistence processes) waited for, workers joined, the
temporary directory removed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from .common import key_of, machine, median, percentile, record, released_worker, replace_section, run_released_together

__all__ = ["main", "run", "DEFAULT_RECORDS"]

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "performance-durability.md")
DEFAULT_RECORDS = 1_000_000
BATCH = 10_000  # records per loading transaction (default)
KEYS = 1000  # keys of root["counters"] (and rows of the SQLite table)
GRACE = 0.2  # seconds the benchmark's coordinators linger after their last client
WARMUP = 30  # untimed commits a worker makes before the round starts
READY_TIMEOUT = 120.0  # seconds a worker may take to open its store and warm up
EXIT_TIMEOUT = 60.0  # seconds we wait for a coordinator or persistence process to exit
RAW_RECORD = 64  # bytes per write of the raw fsync loops (about one small WAL record)
INSTANCES: set[str] = set()  # instance ids of every coordinator the benchmark's databases used

# targets
SYNC_1_TARGET = 1.0  # ProtoBase sync 1 client / SQLite 1 process, at least
SYNC_2_TARGET = 2.0  # ProtoBase sync 2 clients / SQLite 2 processes, at least
ASYNC_TARGET = 10.0  # ProtoBase async / sync, 1 client, at least

UPSERT = "INSERT OR REPLACE INTO counters(k, v) VALUES (?, ?)"


# -- small helpers -----------------------------------------------------------------------


def counter_key(client: int, clients: int, n: int) -> str:
    """The n-th key client `client` of `clients` writes: disjoint per client, so clients never conflict."""
    return f"k{(client + clients * n) % KEYS}"


def filesystem_of(path: str) -> str:
    """`df -T path` as "type (device, mount point)"."""
    try:
        lines = subprocess.run(["df", "-T", path], capture_output=True, text=True, check=True).stdout.splitlines()
        device, kind, *_, mount = lines[1].split()
        return f"{kind} ({device} on {mount})"
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        return "unknown"


def wal_file_bytes(path: str) -> int:
    """Bytes of header and records in the wal-*.log files of `path` (not the zeros preallocated after them)."""
    from protobase.persistence.wal.files import list_wal_files
    from protobase.persistence.wal.reader import scan

    return sum(scan(file).good_end for _, file in list_wal_files(path))


def checkpoint_file_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(path, name))
        for name in os.listdir(path)
        if name.startswith("checkpoint-") and name.endswith(".pb")
    )


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.005)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited: it holds no lock nor file any more
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_coordinator(pid: int) -> None:
    """kill -9 a coordinator this benchmark started, and wait until it is gone."""
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), EXIT_TIMEOUT, f"coordinator {pid} to die")


def wait_unserved(path: str) -> None:
    """Wait until no coordinator serves `path` (its shared memory is then gone) and no persistence process writes."""
    from protobase.core.datadir import DataDir, FileLock

    datadir = DataDir(path)
    if not datadir.wait_until_unserved(timeout=EXIT_TIMEOUT):
        raise RuntimeError(f"the coordinator of {path} did not exit within {EXIT_TIMEOUT:.0f}s")
    lock = FileLock(datadir.file("wal.lock"))  # held by the persistence process for its whole life
    wait_for(lambda: lock.acquire(blocking=False), EXIT_TIMEOUT, f"the persistence process of {path} to exit")
    lock.release()


def close_and_wait(db: Any) -> None:
    path = db.path
    INSTANCES.add(db.instance_id)
    db.close()
    wait_unserved(path)


def leaked_shared_memory() -> list[str]:
    """/dev/shm entries left by the instances this benchmark's databases were served by."""
    from protobase.shm import names

    return [entry for instance in sorted(INSTANCES) for entry in names.instance_entries(instance)]


def write_syscalls(pid: int | None) -> int | None:
    """Write-like system calls of process `pid` so far (/proc/PID/io syscw; socket sends do not count)."""
    try:
        with open(f"/proc/{pid}/io") as io_file:
            for line in io_file:
                if line.startswith("syscw:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


@contextmanager
def temporary_directory() -> Iterator[str]:
    """A private directory under /tmp (one filesystem for every store), removed on exit."""
    path = tempfile.mkdtemp(prefix="protobase-durability-", dir="/tmp")
    os.chmod(path, 0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def top_functions(profile: str | cProfile.Profile, sort: str, limit: int) -> str:
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.strip_dirs().sort_stats(sort).print_stats(limit)
    return "\n".join(line for line in text.getvalue().splitlines() if line.strip())


# -- the stores, as seen by one worker ---------------------------------------------------------


def protobase_commit(db: Any, client: int, clients: int, keys: int, i: int) -> None:
    """The benchmark's ProtoBase commit: `keys` keys of root["counters"] set to `i`."""
    with db.transaction() as tx:
        counters = tx.root["counters"]
        for j in range(keys):
            counters[counter_key(client, clients, i * keys + j)] = i


def sqlite_commit(con: sqlite3.Connection, client: int, clients: int, keys: int, i: int) -> None:
    """The same commit in SQLite: one statement in autocommit mode, or `keys` in one transaction."""
    if keys == 1:
        con.execute(UPSERT, (counter_key(client, clients, i), i))
        return
    con.execute("BEGIN IMMEDIATE")
    con.executemany(UPSERT, [(counter_key(client, clients, i * keys + j), i) for j in range(keys)])
    con.execute("COMMIT")


def sqlite_connect(path: str) -> sqlite3.Connection:
    con = sqlite3.connect(path, timeout=60.0, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=FULL")
    return con


class ProtoBaseClient:
    def __init__(self, path: str, mode: str, client: int, clients: int, keys_per_commit: int) -> None:
        import protobase
        from protobase import ConflictError

        self.conflict_error = ConflictError
        self.db = protobase.open(path, durability=mode, shutdown_grace=GRACE)
        self.args = (client, clients, keys_per_commit)

    def commit(self, i: int) -> None:
        protobase_commit(self.db, *self.args, i)

    def close(self) -> None:
        self.db.close()


class SQLiteClient:
    def __init__(self, path: str, mode: str, client: int, clients: int, keys_per_commit: int) -> None:
        self.conflict_error = sqlite3.OperationalError  # "database is locked" after the busy timeout
        self.con = sqlite_connect(path)
        self.args = (client, clients, keys_per_commit)

    def commit(self, i: int) -> None:
        sqlite_commit(self.con, *self.args, i)

    def close(self) -> None:
        self.con.close()


class RawFsyncClient:
    """A small write then fdatasync: the floor a durable commit on this disk stands on."""

    def __init__(self, path: str, mode: str, client: int, clients: int, keys_per_commit: int) -> None:
        self.conflict_error = ()
        self.mode = mode  # "append" (the file grows, as the WAL does) or "overwrite" (preallocated)
        self.path = f"{path}-{client}"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.size = 1 << 24
        if mode == "overwrite":
            os.write(self.fd, b"\0" * self.size)
            os.fsync(self.fd)
        self.payload = b"x" * RAW_RECORD

    def commit(self, i: int) -> None:
        if self.mode == "overwrite":
            os.pwrite(self.fd, self.payload, (i * RAW_RECORD) % self.size)
        else:
            os.write(self.fd, self.payload)
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)


class RawRoundTripClient:
    """One byte to an echo process and back over a Unix socket pair: the floor of one process hop.

    A ProtoBase commit crosses processes at least twice (client -> coordinator
    -> client); a sync one also goes to the persistence process and back.
    The echo child is forked here, does nothing but echo, and exits at EOF.
    """

    def __init__(self, path: str, mode: str, client: int, clients: int, keys_per_commit: int) -> None:
        self.conflict_error = ()
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.echo_pid = os.fork()
        if self.echo_pid == 0:  # the echo child
            self.sock.close()
            while data := theirs.recv(64):
                theirs.sendall(data)
            os._exit(0)
        theirs.close()

    def commit(self, i: int) -> None:
        self.sock.sendall(b"x")
        self.sock.recv(64)

    def close(self) -> None:
        self.sock.close()
        os.waitpid(self.echo_pid, 0)


STORES = {"protobase": ProtoBaseClient, "sqlite": SQLiteClient, "raw": RawFsyncClient, "echo": RawRoundTripClient}


@released_worker
def _commit_worker(
    conn: Any,
    start: Any,
    store: str,
    path: str,
    mode: str,
    client: int,
    clients: int,
    keys_per_commit: int,
    seconds: float,
    profile: bool,
) -> dict:
    """Open the store, warm up, say "ready", wait for `start`, commit for `seconds`; the result."""
    handle = STORES[store](path, mode, client, clients, keys_per_commit)
    try:
        for i in range(WARMUP):
            handle.commit(i)
        conn.send(("ready", None))
        if not start.wait(READY_TIMEOUT):
            raise RuntimeError("the round never started")
        profiler = cProfile.Profile() if profile else None
        latencies = []
        conflicts = 0
        clock = time.perf_counter
        i = WARMUP
        if profiler:
            profiler.enable()
        began = clock()
        deadline = began + seconds
        now = began
        while now < deadline:
            try:
                handle.commit(i)
            except handle.conflict_error:
                conflicts += 1
            else:
                latencies.append(clock() - now)
            i += 1
            now = clock()
        if profiler:
            profiler.disable()
        result = {
            "commits": len(latencies),
            "seconds": now - began,
            "latencies": latencies,
            "conflicts": conflicts,
            "profile": top_functions(profiler, "tottime", 14) if profiler else None,
        }
    finally:
        handle.close()
    return result


def commit_round(
    store: str, path: str, mode: str, clients: int, seconds: float, keys_per_commit: int = 1, profile: bool = False
) -> dict:
    """`clients` worker processes commit at once for `seconds`; their aggregate rate and latencies."""
    results = run_released_together(
        _commit_worker,
        [(store, path, mode, client, clients, keys_per_commit, seconds, profile) for client in range(clients)],
        [f"bench-{store}-{mode}-{client}" for client in range(clients)],
        READY_TIMEOUT,
        seconds + READY_TIMEOUT,
        EXIT_TIMEOUT,
    )
    return {
        "rate": sum(r["commits"] / r["seconds"] for r in results),
        "commits": sum(r["commits"] for r in results),
        "latencies": [latency for r in results for latency in r["latencies"]],
        "conflicts": sum(r["conflicts"] for r in results),
        "profile": results[0]["profile"],
    }


# -- 1 and 2: commit rates ----------------------------------------------------------------------

# (name, store, mode, clients)
COMMIT_CONFIGS = [
    ("pb-sync-1", "protobase", "sync", 1),
    ("pb-sync-2", "protobase", "sync", 2),
    ("sqlite-1", "sqlite", "full", 1),
    ("sqlite-2", "sqlite", "full", 2),
    ("pb-async-1", "protobase", "async", 1),
    ("raw-append", "raw", "append", 1),
    ("raw-overwrite", "raw", "overwrite", 1),
    ("raw-round-trip", "echo", "-", 1),
]


def setup_sqlite(path: str) -> None:
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE counters(k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
        con.execute("BEGIN")
        con.executemany(UPSERT, [(f"k{i}", 0) for i in range(KEYS)])
        con.execute("COMMIT")
    finally:
        con.close()


def bench_commits(tmp: str, seconds: float, repeats: int) -> dict:
    import protobase

    pb_path, sqlite_path, raw_path = (os.path.join(tmp, name) for name in ("commits", "commits.sqlite", "raw"))
    setup_sqlite(sqlite_path)
    db = protobase.open(pb_path, shutdown_grace=GRACE)  # kept open: one coordinator serves every round
    try:
        with db.transaction() as tx:
            tx.root["counters"] = {f"k{i}": 0 for i in range(KEYS)}
        before = db.stats()
        paths = {"protobase": pb_path, "sqlite": sqlite_path, "raw": raw_path, "echo": raw_path}
        rounds: dict[str, list[dict]] = {name: [] for name, *_ in COMMIT_CONFIGS}
        for repeat in range(repeats):
            shift = repeat % len(COMMIT_CONFIGS)
            for name, store, mode, clients in COMMIT_CONFIGS[shift:] + COMMIT_CONFIGS[:shift]:
                stats = db.stats()
                writes = write_syscalls(stats.persistence_pid)
                result = commit_round(store, paths[store], mode, clients, seconds)
                if store == "protobase":
                    # One drain of the ring = one write(2) of the batch: commits per write is the group size.
                    after_round = db.stats()
                    writes_after = write_syscalls(after_round.persistence_pid)
                    if (
                        writes is not None
                        and writes_after is not None
                        and writes_after > writes
                        and after_round.persistence_pid == stats.persistence_pid
                    ):
                        result["group"] = (after_round.commits - stats.commits) / (writes_after - writes)
                rounds[name].append(result)
                print(f"  repeat {repeat + 1}/{repeats} {name:14} {result['rate']:9,.0f} commits/s", flush=True)
        after = db.stats()
    finally:
        close_and_wait(db)
    return {
        "rounds": rounds,
        "seconds": seconds,
        "repeats": repeats,
        "checkpoints": after.checkpoints - before.checkpoints,
        "compactions": after.compactions - before.compactions,
    }


# -- 3: recovery -------------------------------------------------------------------------------------


def load(db: Any, records: int, batch: int) -> None:
    with db.transaction() as tx:
        tx.root["users"] = {}
    for begin in range(0, records, batch):
        with db.transaction() as tx:
            users = tx.root["users"]
            for i in range(begin, min(records, begin + batch)):
                users[key_of(i)] = record(i)


def protobase_commit_records(db: Any, records: int, i: int) -> None:
    """An async commit of new scores for 10 records spread over the data set."""
    with db.transaction(durability="async") as tx:
        users = tx.root["users"]
        for j in range(10):
            users[key_of((i * 10 + j) * 7919 % records)]["score"] = 1000 + i


def timed_open(path: str, key: str, expected_score: int | None) -> tuple[float, Any]:
    """Seconds from protobase.open to the first snapshot read; returns them and the open database."""
    import protobase

    started = time.perf_counter()
    db = protobase.open(path, shutdown_grace=GRACE)
    try:
        with db.snapshot() as snap:
            score = snap.root["users"][key]["score"] if key else snap.seq
        elapsed = time.perf_counter() - started
        if expected_score is not None and score != expected_score:
            raise RuntimeError(f"recovered {key}.score = {score}, expected {expected_score}")
    except BaseException:
        close_and_wait(db)
        raise
    return elapsed, db


def recovered_records(db: Any) -> int | None:
    """WAL records the coordinator replayed when it started (not in DatabaseStats: asked directly)."""
    try:
        return db.session.request(["stats"])[1].get("recovered_records")
    except Exception:
        return None


def bench_recovery(tmp: str, records: int, repeats: int, crash_commits: int, batch: int) -> dict:
    import protobase

    result: dict[str, Any] = {"records": records, "crash_commits": crash_commits, "batch": batch}
    empty = os.path.join(tmp, "empty")
    protobase.open(empty, shutdown_grace=GRACE).close()
    wait_unserved(empty)
    path = os.path.join(tmp, "recovery")
    last_key = key_of(records - 1)

    db = protobase.open(path, shutdown_grace=GRACE)
    try:
        started = time.perf_counter()
        load(db, records, batch)
        result["load_seconds"] = time.perf_counter() - started
    finally:
        started = time.perf_counter()
        close_and_wait(db)  # a clean stop writes the final checkpoint
        result["final_checkpoint_seconds"] = time.perf_counter() - started
    result["checkpoint_bytes"] = checkpoint_file_bytes(path)

    empty_opens, clean_opens, crash_opens, crash_wal, replayed = [], [], [], [], []
    expected = record(records - 1)["score"]  # of last_key, as the latest commit left it
    for repeat in range(repeats):
        seconds, db = timed_open(empty, "", None)
        close_and_wait(db)
        empty_opens.append(seconds)

        seconds, db = timed_open(path, last_key, expected)
        replayed.append(recovered_records(db))
        close_and_wait(db)  # nothing changed: no new checkpoint
        clean_opens.append(seconds)

        # crash: commits that only the WAL holds, then kill -9 of the coordinator
        db = protobase.open(path, shutdown_grace=GRACE)
        try:
            checkpoints = db.stats().checkpoints
            wal_before = wal_file_bytes(path)
            for i in range(crash_commits):
                protobase_commit_records(db, records, repeat * crash_commits + i)
            with db.transaction() as tx:  # sync: every commit before it is durable too
                tx.root["users"][last_key]["score"] = -1 - repeat
            stats = db.stats()
            if stats.checkpoints != checkpoints or stats.durable_lsn != stats.last_lsn:
                raise RuntimeError(f"a checkpoint ran or commits are not durable before the crash: {stats}")
            crash_wal.append(wal_file_bytes(path) - wal_before)
            INSTANCES.add(db.instance_id)
            kill_coordinator(db.coordinator_pid)
        finally:
            db.close()
        wait_unserved(path)  # the orphaned persistence process drains the ring and exits
        expected = -1 - repeat
        seconds, db = timed_open(path, last_key, expected)
        replayed.append(recovered_records(db))
        close_and_wait(db)  # a clean stop: checkpoint again for the next repeat
        crash_opens.append(seconds)
        print(
            f"  repeat {repeat + 1}/{repeats}: empty {empty_opens[-1]:.2f}s, clean {clean_opens[-1]:.2f}s, "
            f"after kill -9 {crash_opens[-1]:.2f}s",
            flush=True,
        )
    result.update(
        empty=empty_opens,
        clean=clean_opens,
        crash=crash_opens,
        crash_wal_bytes=median(crash_wal),
        replayed=replayed,
        checkpoint_bytes_after=checkpoint_file_bytes(path),
    )
    return result


# -- 4: WAL bytes per commit ------------------------------------------------------------------------


def bench_wal_bytes(tmp: str, commits: int) -> dict:
    """WAL growth per commit. ProtoBase commits async (the record is the same as a sync one's; only the
    ring flag differs) and the files are measured once every record is durable."""
    import protobase

    result: dict[str, Any] = {"commits": commits}
    path = os.path.join(tmp, "walbytes")
    db = protobase.open(path, durability="async", shutdown_grace=GRACE)
    try:
        with db.transaction() as tx:
            tx.root["counters"] = {f"k{i}": 0 for i in range(KEYS)}

        def durable() -> bool:
            stats = db.stats()
            return stats.durable_lsn == stats.last_lsn

        for keys in (1, 10):
            wait_for(durable, EXIT_TIMEOUT, "the WAL to be durable")
            stats = db.stats()
            files, payload = wal_file_bytes(path), stats.wal_bytes_since_checkpoint
            for i in range(commits):
                protobase_commit(db, 0, 1, keys, i)
            wait_for(durable, EXIT_TIMEOUT, "the WAL to be durable")
            after = db.stats()
            if after.checkpoints != stats.checkpoints or after.commits - stats.commits != commits:
                raise RuntimeError(f"a checkpoint or another commit ran while WAL bytes were measured: {after}")
            result[f"protobase-{keys}"] = {
                "file": (wal_file_bytes(path) - files) / commits,
                "payload": (after.wal_bytes_since_checkpoint - payload) / commits,
            }
    finally:
        close_and_wait(db)

    sqlite_path = os.path.join(tmp, "walbytes.sqlite")
    setup_sqlite(sqlite_path)
    con = sqlite_connect(sqlite_path)
    try:
        con.execute("PRAGMA wal_autocheckpoint=0")  # the WAL only grows while we measure
        for keys in (1, 10):
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            before = os.path.getsize(sqlite_path + "-wal")
            for i in range(commits):
                sqlite_commit(con, 0, 1, keys, i)
            result[f"sqlite-{keys}"] = {"file": (os.path.getsize(sqlite_path + "-wal") - before) / commits}
        result["sqlite_page_size"] = con.execute("PRAGMA page_size").fetchone()[0]
    finally:
        con.close()
    return result


# -- profiling -----------------------------------------------------------------------------------


def profile_commits(tmp: str, mode: str, seconds: float) -> dict:
    """A client's and the coordinator's cProfile over `seconds` of single-key commits in `mode`.

    The coordinator is started in the foreground under `python -m cProfile`
    (the module `protobase.open` would start detached); the client attaches to it.
    """
    from protobase.client.launcher import try_connect
    from protobase.core.datadir import DataDir

    path = os.path.join(tmp, f"profile-{mode}")
    datadir = DataDir.open(path)
    output = os.path.join(tmp, f"coordinator-{mode}.prof")
    command = [
        sys.executable,
        "-m",
        "cProfile",
        "-o",
        output,
        "-m",
        "protobase.coordinator",
        path,
        "--grace",
        str(GRACE),
    ]
    coordinator = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:

        def listening() -> bool:
            sock = try_connect(datadir)
            if sock is not None:
                sock.close()
            return sock is not None or coordinator.poll() is not None

        wait_for(listening, READY_TIMEOUT, "the profiled coordinator to listen")
        import protobase

        with protobase.open(path, shutdown_grace=GRACE) as db:  # held open: the coordinator serves the round
            with db.transaction() as tx:
                tx.root["counters"] = {f"k{i}": 0 for i in range(KEYS)}
            client = commit_round("protobase", path, mode, 1, seconds, profile=True)
        coordinator.wait(EXIT_TIMEOUT)
    finally:
        if coordinator.poll() is None:
            coordinator.terminate()
            coordinator.wait()
        wait_unserved(path)
    return {
        "rate": client["rate"],
        "client": client["profile"],
        "coordinator": top_functions(output, "tottime", 16),
        "coordinator_cumulative": top_functions(output, "cumulative", 30),
    }


# -- the report -----------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f} ms"


def report(
    command: str, info: dict, commits: dict | None, recovery: dict | None, wal_bytes: dict | None
) -> tuple[str, list[str]]:
    """The markdown report and the list of missed targets."""
    missed: list[str] = []
    lines = [
        f"Command: `{command}`  ",
        f"Date: {info['date']}; machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"SQLite {sqlite3.sqlite_version}; /tmp is {info['filesystem']}; load average at start {info['load']}.",
        "",
    ]
    if commits:
        rounds = commits["rounds"]
        rate = {name: [r["rate"] for r in results] for name, results in rounds.items()}

        def ratio(a: str, b: str) -> float:
            return median([x / y for x, y in zip(rate[a], rate[b])])

        one, two = ratio("pb-sync-1", "sqlite-1"), ratio("pb-sync-2", "sqlite-2")
        fast = ratio("pb-async-1", "pb-sync-1")
        checks = [
            (
                one >= SYNC_1_TARGET,
                f"durable commits, 1 client: ProtoBase/SQLite = {one:.2f}x, target >= {SYNC_1_TARGET:g}x",
            ),
            (
                two >= SYNC_2_TARGET,
                f"durable commits, 2 clients: ProtoBase/SQLite = {two:.2f}x, target >= {SYNC_2_TARGET:g}x",
            ),
            (fast >= ASYNC_TARGET, f"async/sync commits, 1 client = {fast:.2f}x, target >= {ASYNC_TARGET:g}x"),
        ]
        missed += [text for ok, text in checks if not ok]
        labels = {
            "pb-sync-1": (
                'ProtoBase `durability="sync"`, 1 client',
                f"**{one:.2f}x** SQLite 1 (target >= {SYNC_1_TARGET:g}x: {_verdict(one >= SYNC_1_TARGET)})",
            ),
            "pb-sync-2": (
                'ProtoBase `durability="sync"`, 2 clients (aggregate)',
                f"**{two:.2f}x** SQLite 2 "
                f"(target >= {SYNC_2_TARGET:g}x: {_verdict(two >= SYNC_2_TARGET)}); "
                f"{ratio('pb-sync-2', 'pb-sync-1'):.2f}x ProtoBase 1",
            ),
            "sqlite-1": ("SQLite WAL, `synchronous=FULL`, 1 process", "reference"),
            "sqlite-2": (
                "SQLite WAL, `synchronous=FULL`, 2 processes (aggregate)",
                f"reference; {ratio('sqlite-2', 'sqlite-1'):.2f}x SQLite 1",
            ),
            "pb-async-1": (
                'ProtoBase `durability="async"`, 1 client',
                f"**{fast:.2f}x** ProtoBase sync 1 (target >= {ASYNC_TARGET:g}x: {_verdict(fast >= ASYNC_TARGET)})",
            ),
            "raw-append": (
                f"raw loop: append {RAW_RECORD} B + `fdatasync` (as the WAL wrote until 2026-11-27)",
                f"floor; ProtoBase sync 1 = {ratio('pb-sync-1', 'raw-append'):.2f}x of it",
            ),
            "raw-overwrite": (
                f"raw loop: overwrite {RAW_RECORD} B in a preallocated file + `fdatasync` (as the WAL writes)",
                f"{ratio('raw-overwrite', 'raw-append'):.2f}x the append loop",
            ),
            "raw-round-trip": (
                "raw loop: 1 byte to an echo process and back (Unix socket pair)",
                "floor of one process round trip",
            ),
        }

        lines += [
            f"### Single-key commits ({commits['repeats']} interleaved repeats of {commits['seconds']:g} s "
            "per configuration, each client in its own process)",
            "",
            'Loop: `with db.transaction() as tx: tx.root["counters"][key] = i` (1,000 keys, disjoint per client); '
            "SQLite: `INSERT OR REPLACE INTO counters(k, v) VALUES (?, ?)` in autocommit.",
            "",
            "| configuration | commits/s (median) | ratio (median of per-repeat ratios) | latency p50 | p99 |",
            "|---|---:|---|---:|---:|",
        ]
        for name, (label, note) in labels.items():
            latencies = [latency for r in rounds[name] for latency in r["latencies"]]
            lines.append(
                f"| {label} | {median(rate[name]):,.0f} | {note} | {_ms(percentile(latencies, 0.5))} | "
                f"{_ms(percentile(latencies, 0.99))} |"
            )
        # What the process design costs before any Python work: two round trips and one fsync.
        round_trip, fsync = 1 / median(rate["raw-round-trip"]), 1 / median(rate["raw-overwrite"])
        floor = 2 * round_trip + fsync
        lines += [
            "",
            f"Floor of this design on this machine: a sync commit crosses processes twice "
            f"(client -> coordinator -> client, coordinator -> persistence -> coordinator) around one "
            f"write + `fdatasync` into the preallocated WAL: "
            f"2 x {round_trip * 1e3:.3f} + {fsync * 1e3:.3f} = {floor * 1e3:.3f} ms, "
            f"at most {1 / floor:,.0f} commits/s for one client, "
            f"{1 / floor / median(rate['sqlite-1']):.2f}x SQLite 1, before any Python work; "
            f"an async commit's floor is one round trip ({1 / round_trip:,.0f}/s), "
            f"{(1 / round_trip) / (1 / floor):.1f}x the sync floor.",
        ]
        conflicts = sum(r["conflicts"] for results in rounds.values() for r in results)

        groups = {name: [r["group"] for r in results if "group" in r] for name, results in rounds.items()}
        lines += [
            "",
            "Per-repeat commits/s: "
            + "; ".join(f"{name} " + ", ".join(f"{x:,.0f}" for x in rate[name]) for name in rounds)
            + ".  ",
            "ProtoBase commits per WAL write (the persistence process writes each drained batch with one "
            "write(2), counted in /proc/PID/io; for sync commits one batch = one fdatasync), median: "
            + ", ".join(f"{name} {median(values):.2f}" for name, values in groups.items() if values)
            + ".  ",
            f"During the timed rounds: {commits['checkpoints']} checkpoints, {commits['compactions']} compactions, "
            f"{conflicts} conflicts or busy errors.",
            "",
        ]
    if recovery:
        empty, clean, crash = (median(recovery[name]) for name in ("empty", "clean", "crash"))
        mib = recovery["checkpoint_bytes"] / (1 << 20)
        lines += [
            f"### Recovery ({recovery['records']:,} records, loaded in {recovery['load_seconds']:.1f} s in "
            f"transactions of {recovery['batch']:,}; median of {len(recovery['clean'])} repeats)",
            "",
            "Time of `protobase.open(path)` until the first snapshot read "
            '(`snap.root["users"][key]["score"]`) returns, the coordinator and its persistence process '
            "started by that open.",
            "",
            "| case | open to first read | minus empty open | what it loads |",
            "|---|---:|---:|---|",
            f"| empty database (reference: process start-up) | {empty:.2f} s | - | nothing |",
            f"| after a clean shutdown (final checkpoint) | {clean:.2f} s | {clean - empty:.2f} s | "
            f"checkpoint of {mib:,.1f} MiB, no WAL record |",
            f"| after `kill -9` of the coordinator | {crash:.2f} s | {crash - empty:.2f} s | same checkpoint + "
            f"{recovery['crash_commits'] + 1:,} WAL records ({recovery['crash_wal_bytes'] / 1024:,.0f} KiB: "
            f"{recovery['crash_commits']:,} async 10-key commits, then a sync 1-key commit) |",
            "",
            f"WAL records replayed at each open (clean, crash, ...): {recovery['replayed']}.  ",
            f"Final checkpoint at the clean shutdown after loading (close until the coordinator exited): "
            f"{recovery['final_checkpoint_seconds']:.1f} s.",
            "",
        ]
    if wal_bytes:
        n = wal_bytes["commits"]
        lines += [
            f"### WAL bytes per commit ({n:,} commits of each kind; growth of the log files / commits)",
            "",
            "| commit | ProtoBase wal-*.log | of which payload | SQLite -wal file "
            f"(page size {wal_bytes['sqlite_page_size']}) | ProtoBase / SQLite |",
            "|---|---:|---:|---:|---:|",
        ]
        for keys in (1, 10):
            pb, sq = wal_bytes[f"protobase-{keys}"], wal_bytes[f"sqlite-{keys}"]
            lines.append(
                f"| {keys} key{'s' if keys > 1 else ''} | {pb['file']:,.1f} B | {pb['payload']:,.1f} B | "
                f"{sq['file']:,.0f} B | {pb['file'] / sq['file']:.3f}x |"
            )
        lines.append("")
    lines.append("Targets missed in this run: " + ("; ".join(missed) if missed else "none") + ".")
    return "\n".join(lines) + "\n", missed


# -- entry point ---------------------------------------------------------------------------------------


def run(
    *,
    records: int,
    seconds: float,
    repeats: int,
    recovery_repeats: int,
    crash_commits: int,
    wal_commits: int,
    batch: int,
    parts: set[str],
    command: str,
    doc: str | None,
    show_profile: bool,
) -> int:
    info = machine()
    info["filesystem"] = filesystem_of("/tmp")
    print(f"durability benchmark: {info['nproc']} CPUs, /tmp on {info['filesystem']}, load {info['load']}", flush=True)
    commits = recovery = wal_bytes = None
    profiles = {}
    with temporary_directory() as tmp:
        if "commits" in parts:
            print("commits ...", flush=True)
            commits = bench_commits(tmp, seconds, repeats)
        if "wal" in parts:
            print("WAL bytes per commit ...", flush=True)
            wal_bytes = bench_wal_bytes(tmp, wal_commits)
        if "recovery" in parts:
            print(f"recovery of {records:,} records ...", flush=True)
            recovery = bench_recovery(tmp, records, recovery_repeats, crash_commits, batch)
        text, missed = report(command, info, commits, recovery, wal_bytes)
        if (missed and commits) or show_profile:
            for mode in ("sync", "async"):
                print(f"profiling {mode} commits ...", flush=True)
                profiles[mode] = profile_commits(tmp, mode, seconds)
    leaked = leaked_shared_memory()
    text += (
        f"\nLeft in /dev/shm by the {len(INSTANCES)} coordinators of this run: "
        f"{', '.join(leaked) if leaked else 'nothing'}.\n"
    )
    print()
    print(text)
    for mode, profile in profiles.items():
        print(f"--- {mode} single-key commits under cProfile: {profile['rate']:,.0f} commits/s ---")
        print("client (sorted by own time):")
        print(profile["client"])
        print("coordinator (sorted by own time):")
        print(profile["coordinator"])
        print("coordinator (sorted by cumulative time):")
        print(profile["coordinator_cumulative"])
        print()
    if doc:
        replace_section(doc, "durability", text)
        print(f"written to {doc}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.durability", description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=DEFAULT_RECORDS, help="records of the recovery part")
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one commit round")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of every commit configuration")
    parser.add_argument("--recovery-repeats", type=int, default=3, help="repeats of each recovery case")
    parser.add_argument(
        "--crash-commits",
        type=int,
        default=1000,
        help="async 10-key commits (then one sync commit) only in the WAL at the crash",
    )
    parser.add_argument("--batch", type=int, default=BATCH, help="records per loading transaction")
    parser.add_argument("--wal-commits", type=int, default=1000, help="commits of each kind for WAL bytes")
    parser.add_argument("--parts", default="commits,wal,recovery", help="comma-separated: commits, wal, recovery")
    parser.add_argument("--doc", default=DOC, help="markdown file to write the results into")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave the doc alone")
    parser.add_argument(
        "--profile", action="store_true", help="profile a client and the coordinator even when the targets are met"
    )
    args = parser.parse_args(argv)
    parts = {part.strip() for part in args.parts.split(",") if part.strip()}
    unknown = parts - {"commits", "wal", "recovery"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose among commits, wal, recovery")
    command = shlex.join(["python", "-m", "benchmarks.durability", *argv])
    return run(
        records=args.records,
        seconds=args.seconds,
        repeats=args.repeats,
        recovery_repeats=args.recovery_repeats,
        crash_commits=args.crash_commits,
        wal_commits=args.wal_commits,
        batch=args.batch,
        parts=parts,
        command=command,
        doc=None if args.no_doc else args.doc,
        show_profile=args.profile,
    )


if __name__ == "__main__":
    sys.exit(main())
