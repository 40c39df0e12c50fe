"""Bulk load of many small records beside SQLite, LMDB and Redis: `python -m benchmarks.bulk`.

The target of issue 12: loading 1M small records is faster than SQLite and
Redis and within 1.5x of LMDB, measured in the same run; with two indexes,
faster than SQLite with two indexes.

Records `{"id": i, "name": "user<i>", "city": one of 50, "score": i % 1000}`
under keys `"user<i:07d>"`. Each load runs in a fresh child process that
builds the records first (not timed) and times only the load, until it is
committed:

* ProtoBase: `tx.root["users"] = records` in one transaction (durability
  "sync": it returns once its WAL record is fsynced); "+ 2 indexes" also calls
  `create_index("city")` and `create_index("score")` in that transaction;
  "update" merges the records into an existing empty `users` with
  `tx.root["users"].update(records)` (one SET per record), "update + 2
  indexes" into one that already has both indexes (these two take the merge
  path once commits.py applies a commit through `Writer.apply_all`; before
  that they path-copy one key at a time and take minutes at 1M records);
* SQLite WAL (`synchronous=NORMAL`): `executemany` of an INSERT per record in
  one transaction, into a table (key TEXT PRIMARY KEY, id, name, city,
  score); "+ 2 indexes" creates the indexes on city and score in the same
  transaction, after the inserts (SQLite's fastest order);
* LMDB: one write transaction, `txn.put(key, pickle.dumps(record))` per
  record, then `env.sync(True)`;
* Redis: a private `redis-server` on a Unix socket in a temporary directory
  (AOF `appendfsync everysec`), records as msgpack under their key, an MSET
  of 10,000 per pipeline (much faster from Python than one SET each).

Rounds interleave the stores (a rotating order), and each ratio is the median
of the per-round ratios, store time / ProtoBase time (above 1: ProtoBase is
faster). Noisy machine: trust the ratios. Nothing is asserted; it prints.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from .common import machine, wait_for_coordinator_exit

CITIES = [f"city{i:02d}" for i in range(50)]
REDIS_PIPELINE = 10_000

# {store name -> (what is timed, the target it serves)}
STORES: dict[str, str] = {
    "ProtoBase": 'tx.root["users"] = records, one transaction',
    "ProtoBase update": 'tx.root["users"].update(records) into an empty users',
    "SQLite WAL": "executemany INSERT in one transaction, synchronous=NORMAL",
    "LMDB": "txn.put(key, pickle.dumps(record)) in one write transaction",
    "Redis": "pipelined MSET of 10,000 key: msgpack(record), unix socket, appendfsync everysec",
    "ProtoBase + 2 indexes": 'the same, then create_index("city") and ("score") in that transaction',
    "ProtoBase update + 2 indexes": "update(records) into an empty users indexed on city and score",
    "SQLite WAL + 2 indexes": "the same, then CREATE INDEX on city and on score in that transaction",
}
PLAIN = ["ProtoBase", "ProtoBase update", "SQLite WAL", "LMDB", "Redis"]
INDEXED = ["ProtoBase + 2 indexes", "ProtoBase update + 2 indexes", "SQLite WAL + 2 indexes"]


def make_records(count: int) -> dict[str, dict[str, Any]]:
    return {
        f"user{i:07d}": {"id": i, "name": f"user{i}", "city": CITIES[i % len(CITIES)], "score": i % 1000}
        for i in range(count)
    }


# -- the loads, each in its own child process ----------------------------------------------


Timing = tuple[float, float]  # (wall-clock seconds of the load, CPU seconds of every process it used)


def cpu_seconds(processes: list[Any]) -> float:
    """CPU time (user + system) of this process and of `processes` (psutil.Process) so far."""
    return time.process_time() + sum(sum(process.cpu_times()[:2]) for process in processes)


def load_protobase(path: str, records: dict[str, dict[str, Any]], indexed: bool, update: bool) -> Timing:
    import psutil

    import protobase

    db = protobase.open(path, durability="sync", shutdown_grace=0.05)
    try:
        if update:
            with db.transaction() as tx:
                tx.root["users"] = {}
                if indexed:
                    tx.root["users"].create_index("city")
                    tx.root["users"].create_index("score")
        coordinator = psutil.Process(db.coordinator_pid)
        servers = [coordinator, *coordinator.children()]  # and its persistence process
        cpu, started = cpu_seconds(servers), time.perf_counter()
        with db.transaction() as tx:
            if update:
                tx.root["users"].update(records)
            else:
                tx.root["users"] = records
                if indexed:
                    tx.root["users"].create_index("city")
                    tx.root["users"].create_index("score")
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(servers) - cpu
        with db.snapshot() as snap:  # what was loaded reads back (not timed)
            users = snap.root["users"]
            last = f"user{len(records) - 1:07d}"
            assert len(users) == len(records) and users[last] == records[last], "the load reads back"
            if indexed:
                assert set(users.indexes) == {"city", "score"}, users.indexes
        return elapsed, cpu
    finally:
        db.close()
        wait_for_coordinator_exit(path)


def load_sqlite(path: str, records: dict[str, dict[str, Any]], indexed: bool) -> Timing:
    conn = sqlite3.connect(os.path.join(path, "bulk.sqlite"), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        cpu, started = time.process_time(), time.perf_counter()
        conn.execute("BEGIN")
        conn.execute("CREATE TABLE users (key TEXT PRIMARY KEY, id INTEGER, name TEXT, city TEXT, score INTEGER)")
        conn.executemany(
            "INSERT INTO users VALUES (?, ?, ?, ?, ?)",
            ((key, r["id"], r["name"], r["city"], r["score"]) for key, r in records.items()),
        )
        if indexed:
            conn.execute("CREATE INDEX users_city ON users (city)")
            conn.execute("CREATE INDEX users_score ON users (score)")
        conn.execute("COMMIT")
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        (count,) = conn.execute("SELECT count(*) FROM users").fetchone()
        assert count == len(records), "the load reads back"
        return elapsed, cpu
    finally:
        conn.close()


def load_lmdb(path: str, records: dict[str, dict[str, Any]]) -> Timing:
    import lmdb

    env = lmdb.open(os.path.join(path, "bulk.lmdb"), map_size=8 << 30, sync=True, metasync=True)
    try:
        cpu, started = time.process_time(), time.perf_counter()
        with env.begin(write=True) as txn:
            dumps, protocol = pickle.dumps, pickle.HIGHEST_PROTOCOL
            for key, value in records.items():
                txn.put(key.encode(), dumps(value, protocol=protocol))
        env.sync(True)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        assert env.stat()["entries"] == len(records), "the load reads back"
        return elapsed, cpu
    finally:
        env.close()


def load_redis(path: str, records: dict[str, dict[str, Any]]) -> Timing:
    import msgpack
    import psutil
    import redis

    socket_path = os.path.join(path, "redis.sock")
    with open(os.path.join(path, "redis.log"), "w") as log:
        server = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", socket_path, "--unixsocketperm", "700"]
            + ["--dir", path, "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        client = redis.Redis(unix_socket_path=socket_path)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start (exit code {server.poll()})") from None
                time.sleep(0.02)
        items = list(records.items())
        packb = msgpack.packb
        servers = [psutil.Process(server.pid)]
        cpu, started = cpu_seconds(servers), time.perf_counter()
        for begin in range(0, len(items), REDIS_PIPELINE):
            pipe = client.pipeline(transaction=False)
            pipe.mset({key: packb(value) for key, value in items[begin : begin + REDIS_PIPELINE]})
            pipe.execute()
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(servers) - cpu
        assert client.dbsize() == len(records), "the load reads back"
        client.close()
        return elapsed, cpu
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def child(store: str, count: int) -> Timing:
    """Load `count` records into `store` in a fresh temporary directory: (wall seconds, CPU seconds)."""
    records = make_records(count)
    path = tempfile.mkdtemp(prefix="protobase-bulk-")
    try:
        if store.startswith("ProtoBase"):
            return load_protobase(os.path.join(path, "db"), records, "indexes" in store, "update" in store)
        if store.startswith("SQLite"):
            return load_sqlite(path, records, "indexes" in store)
        if store == "LMDB":
            return load_lmdb(path, records)
        return load_redis(path, records)
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the run ---------------------------------------------------------------------------------


def unavailable(store: str) -> str | None:
    """Why `store` cannot run here, or None."""
    try:
        if store == "LMDB":
            import lmdb  # noqa: F401
        if store == "Redis":
            import msgpack  # noqa: F401
            import redis  # noqa: F401
    except ImportError as error:
        return f"{error}; pip install '.[bench]'"
    if store == "Redis" and shutil.which("redis-server") is None:
        return "redis-server not found (apt-get install redis-server)"
    return None


def run_child(store: str, count: int) -> Timing:
    command = [sys.executable, "-m", "benchmarks.bulk", "--child", store, "--records", str(count)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{store} failed: {done.stderr.strip()[-2000:]}")
    wall, cpu = json.loads(done.stdout.strip().splitlines()[-1])
    return wall, cpu


def reference_of(store: str) -> str:
    return "ProtoBase + 2 indexes" if "indexes" in store else "ProtoBase"


def run(count: int, rounds: int, stores: list[str]) -> dict[str, list[float]]:
    info = machine()
    print(
        f"bulk load of {count:,} records, {rounds} rounds; {info['date']}, {info['nproc']} CPUs, "
        f"Python {info['python']}, load average {info['load']}"
    )
    skipped = {store: why for store in stores if (why := unavailable(store))}
    stores = [store for store in stores if store not in skipped]
    times: dict[str, list[float]] = {store: [] for store in stores}
    cpus: dict[str, list[float]] = {store: [] for store in stores}
    for round_ in range(rounds):
        order = stores[round_ % len(stores) :] + stores[: round_ % len(stores)]
        for store in order:
            wall, cpu = run_child(store, count)
            times[store].append(wall)
            cpus[store].append(cpu)
            print(f"  round {round_ + 1}: {store:30s} {wall:7.2f} s (CPU {cpu:6.2f} s)", flush=True)
    report(count, times, cpus, skipped)
    return times


def report(count: int, times: dict[str, list[float]], cpus: dict[str, list[float]], skipped: dict[str, str]) -> None:
    print()
    print(
        "| store | what is timed | seconds (median) | us/record | CPU us/record, all its processes | "
        "store / ProtoBase (median of rounds) |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for store, seconds in times.items():
        reference = times.get(reference_of(store))
        ratio = "-"
        if reference and store != reference_of(store):
            ratio = f"{statistics.median(s / r for s, r in zip(seconds, reference)):.2f}x"
        median, cpu = statistics.median(seconds), statistics.median(cpus[store])
        print(
            f"| {store} | {STORES[store]} | {median:.2f} | {median / count * 1e6:.2f} | "
            f"{cpu / count * 1e6:.2f} | {ratio} |"
        )
    for store, why in skipped.items():
        print(f"| {store} | SKIPPED: {why} | | | | |")
    print()
    for line in verdicts(times):
        print(line)


def verdicts(times: dict[str, list[float]]) -> list[str]:
    """The targets of issue 12, each with the ratio that decides it."""

    def ratio(store: str) -> float | None:
        if store not in times or reference_of(store) not in times:
            return None
        return statistics.median(s / r for s, r in zip(times[store], times[reference_of(store)]))

    lines = []
    for store, target, wanted in (
        ("SQLite WAL", "faster than SQLite", 1.0),
        ("Redis", "faster than Redis", 1.0),
        ("LMDB", "within 1.5x of LMDB", 1 / 1.5),
        ("SQLite WAL + 2 indexes", "with 2 indexes, faster than SQLite with 2 indexes", 1.0),
    ):
        value = ratio(store)
        if value is not None:
            met = "met" if value >= wanted else "MISSED"
            lines.append(f"target {target}: {store} / ProtoBase = {value:.2f}x (needs >= {wanted:.2f}x): {met}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bulk", description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="records per load (default 1,000,000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each loading every store once")
    parser.add_argument("--only", nargs="+", choices=list(STORES), default=None, help="only these stores")
    parser.add_argument("--no-indexes", action="store_true", help="skip the loads with two indexes")
    parser.add_argument("--child", choices=list(STORES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.records)))
        return 0
    stores = args.only or (PLAIN if args.no_indexes else PLAIN + INDEXED)
    run(args.records, args.rounds, stores)
    return 0


if __name__ == "__main__":
    sys.exit(main())
