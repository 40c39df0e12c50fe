"""The query benchmark: `python -m benchmarks.queries [--records N] [--no-doc]`.

On `--records` records (default 100,000) `{"id", "name", "city", "score",
"tags"}`, `city` one of 20 cities and `score` in 0..1000 (uniform, seeded),
it runs `(F.city == X) & (F.score > Y)` for several (X, Y) pairs and
materialises the matching records as Python objects (a list of dicts), in one
run, for:

* ProtoBase, `city` and `score` indexed: `list(users.where(expr))` on one
  snapshot. "warm" repeats the query on the same snapshot (the collection view
  memoises equality postings, so the `city == X` key set is computed once per
  snapshot); "warm, memo cleared" empties that memo before every repeat, which
  is what a query costs the first time on a snapshot whose caches are warm;
  "keys only" is `.keys()` (no records materialised), for reference;
* a full scan of the same snapshot: `[r for r in users.values() if ...]`
  (target: the indexed query >= 20x faster);
* SQLite, in memory and in a WAL file (`synchronous=NORMAL`, 64 MiB page
  cache), table `users` with an index on (city, score), `SELECT id, name,
  city, score, tags FROM users WHERE city=? AND score>?`, rows turned into
  dicts (`dict(zip(columns, row))`, tags left as their JSON text); the faster
  of the two is the reference (target: ProtoBase >= 2x faster). Raw tuples,
  and dicts with the tags decoded by `json.loads`, are reported beside it;
* ZODB: a FileStorage in the temporary directory holding an OOBTree keyed by
  (city, score, id) whose values are the record dicts, committed, then
  reopened (`cache_size` large enough for the whole tree), a fresh connection
  warmed by one pass over the tree, queried with
  `list(tree.values(min=(X, Y + 1), max=(X, 1001)))` (target: ProtoBase at
  least as fast).

Cold numbers are the first query on a freshly opened handle (ProtoBase: a new
`protobase.open` of the running database, so the per-process caches are
empty; SQLite file: a new connection; ZODB: a new DB on the FileStorage),
median over `--cold-repeats` fresh handles. Warm numbers are medians of
`--repeats` rounds in which every method takes one sample per pair,
interleaved, so the noise of a shared machine falls on all of them alike; a
sample is the time per call of back-to-back calls filling 20 ms (one call
for the full scan), as `timeit` does. Every method's

result is checked against the others (same record ids). Nothing is asserted.

The report (a markdown table, the plans printed by `explain()`, the targets)
is printed and written into docs/performance-queries.md between
`<!-- queries:begin -->` and `<!-- queries:end -->`. When a target is missed
(or with `--profile`), a cProfile of the ProtoBase query path is printed and
recorded too.

Everything this opens is closed before it returns: databases closed, the
coordinator waited for (`DataDir.wait_until_unserved`), the temporary
directory removed.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import random
import shlex
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import protobase
from protobase.core.datadir import DataDir
from protobase.query import F

from .common import machine, median, replace_section

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "performance-queries.md")
SECTION = "queries"

DEFAULT_RECORDS = 100_000
CITIES = tuple(f"city{i:02d}" for i in range(20))
TAGS = ("red", "green", "blue", "vip", "new", "old")
MAX_SCORE = 1000
PAIRS = ((CITIES[3], 990), (CITIES[7], 900), (CITIES[11], 500))  # (X, Y): city == X and score > Y
LOAD_BATCH = 25_000
SQLITE_SQL = "SELECT id, name, city, score, tags FROM users WHERE city = ? AND score > ?"
ZODB_CACHE_OBJECTS = 1_000_000

SCAN_TARGET = 20.0  # indexed query >= 20x faster than a full scan
SQLITE_TARGET = 2.0  # ProtoBase >= 2x faster than SQLite returning dicts
ZODB_TARGET = 1.0  # ProtoBase at least as fast as ZODB
SAMPLE_SECONDS = 0.02  # one warm sample: back-to-back calls for this long, time per call


# -- the data set -------------------------------------------------------------------------


def make_records(count: int, seed: int) -> dict[str, dict]:
    """{key: record}, reproducible for a seed."""
    rng = random.Random(seed)
    return {
        f"user{i}": {
            "id": i,
            "name": f"user{i}",
            "city": rng.choice(CITIES),
            "score": rng.randint(0, MAX_SCORE),
            "tags": rng.sample(TAGS, 2),
        }
        for i in range(count)
    }


def _ids(records: list) -> list[int]:
    return sorted(r["id"] if isinstance(r, dict) else r[0] for r in records)


# -- ProtoBase ----------------------------------------------------------------------------------


def load_protobase(path: str, records: dict[str, dict], **options: Any) -> protobase.Database:
    """The users collection loaded and indexed, by a coordinator started with `options` (of protobase.open)."""
    db = protobase.open(path, durability="async", shutdown_grace=0.2, **options)
    items = list(records.items())
    for start in range(0, len(items), LOAD_BATCH):
        with db.transaction() as tx:
            if start == 0:
                tx.root["users"] = dict(items[:LOAD_BATCH])
            else:
                users = tx.root["users"]
                for key, value in items[start : start + LOAD_BATCH]:
                    users[key] = value
    with db.transaction() as tx:
        tx.root["users"].create_index("city")
        tx.root["users"].create_index("score")
        # The index a user makes for this query, as SQLite gets (city, score) and ZODB a
        # (city, score, id) key: the planner takes it for `city == X & score > Y`.
        tx.root["users"].create_index("city", "score")
    return db


def pb_query(users: Any, city: str, score: int) -> list:
    return list(users.where((F.city == city) & (F.score > score)))


def pb_query_cleared(users: Any, city: str, score: int) -> list:
    memo = getattr(users, "_postings", None)  # private: the per-view memo of equality postings
    if memo is not None:
        memo.clear()
    return list(users.where((F.city == city) & (F.score > score)))


def pb_keys(users: Any, city: str, score: int) -> list:
    memo = getattr(users, "_postings", None)
    if memo is not None:
        memo.clear()
    return users.where((F.city == city) & (F.score > score)).keys()


def pb_scan(users: Any, city: str, score: int) -> list:
    return [r for r in users.values() if r["city"] == city and r["score"] > score]


# -- SQLite -------------------------------------------------------------------------------------


def load_sqlite(target: str, records: dict[str, dict]) -> None | sqlite3.Connection:
    """Fill `target` (a file, or ":memory:" whose connection is returned)."""
    conn = sqlite3.connect(target)
    if target != ":memory:":
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE users (key TEXT PRIMARY KEY, id INTEGER, name TEXT, city TEXT, score INTEGER, tags TEXT)"
    )
    with conn:
        conn.executemany(
            "INSERT INTO users VALUES (?, ?, ?, ?, ?, ?)",
            ((key, r["id"], r["name"], r["city"], r["score"], json.dumps(r["tags"])) for key, r in records.items()),
        )
    conn.execute("CREATE INDEX users_city_score ON users (city, score)")
    conn.execute("ANALYZE")
    conn.commit()
    if target == ":memory:":
        return conn
    conn.close()
    return None


def open_sqlite_file(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: the whole database stays in the page cache
    return conn


def sqlite_dicts(conn: sqlite3.Connection, city: str, score: int) -> list:
    cursor = conn.execute(SQLITE_SQL, (city, score))
    columns = [column[0] for column in cursor.description]
    return [dict(zip(columns, row)) for row in cursor]


def sqlite_dicts_json(conn: sqlite3.Connection, city: str, score: int) -> list:
    cursor = conn.execute(SQLITE_SQL, (city, score))
    columns = [column[0] for column in cursor.description]
    result = []
    for row in cursor:
        found = dict(zip(columns, row))
        found["tags"] = json.loads(found["tags"])
        result.append(found)
    return result


def sqlite_tuples(conn: sqlite3.Connection, city: str, score: int) -> list:
    return conn.execute(SQLITE_SQL, (city, score)).fetchall()


def sqlite_plan(conn: sqlite3.Connection) -> str:
    rows = conn.execute("EXPLAIN QUERY PLAN " + SQLITE_SQL, PAIRS[0]).fetchall()
    return "; ".join(row[-1] for row in rows)


# -- ZODB ---------------------------------------------------------------------------------------


class ZodbHandle:
    """A ZODB database on a FileStorage, one connection, its own transaction manager."""

    def __init__(self, path: str) -> None:
        import transaction
        import ZODB
        import ZODB.FileStorage

        self.db = ZODB.DB(ZODB.FileStorage.FileStorage(path), cache_size=ZODB_CACHE_OBJECTS)
        self.manager = transaction.TransactionManager()
        self.conn = self.db.open(transaction_manager=self.manager)
        self.root = self.conn.root

    @property
    def tree(self) -> Any:
        return self.root()["users"]

    def close(self) -> None:
        self.manager.abort()
        self.conn.close()
        self.db.close()


def load_zodb(path: str, records: dict[str, dict]) -> None:
    from BTrees.OOBTree import OOBTree

    handle = ZodbHandle(path)
    try:
        tree = OOBTree()
        handle.root()["users"] = tree
        tree.update({(r["city"], r["score"], r["id"]): r for r in records.values()})
        handle.manager.commit()
    finally:
        handle.close()


def zodb_values(tree: Any, city: str, score: int) -> list:
    return list(tree.values(min=(city, score + 1), max=(city, MAX_SCORE + 1)))


# -- timing ---------------------------------------------------------------------------------------


def timed(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def timed_per_call(fn: Callable[..., Any], *args: Any) -> float:
    """Seconds per call, over as many back-to-back calls as fill SAMPLE_SECONDS (at least one).

    One call of a 30-microsecond query is at the mercy of a timer tick or a
    collection; a batch is not. Every warm method is sampled the same way.
    """
    calls, start = 0, time.perf_counter()
    while True:
        fn(*args)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= SAMPLE_SECONDS:
            return elapsed / calls


def profile_query(users: Any, city: str, score: int, rounds: int) -> str:
    """cProfile of the warm ProtoBase query (memo cleared): the top functions by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(rounds):
        pb_query_cleared(users, city, score)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(12)
    lines = [
        line.rstrip()
        for line in out.getvalue().splitlines()
        if line.strip() and "Ordered by" not in line and "List reduced" not in line
    ]
    return "\n".join(line.replace(os.path.dirname(os.path.dirname(protobase.__file__)) + "/", "") for line in lines)


# -- the run ----------------------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(f"[queries] {message}", file=sys.stderr, flush=True)


def _ms(seconds: float) -> str:
    milliseconds = seconds * 1000
    return f"{milliseconds:.2f}" if milliseconds >= 0.1 else f"{milliseconds:.4f}"


def _check(results: dict[str, list[int]], pair: tuple[str, int]) -> None:
    reference = results["ProtoBase"]
    for name, ids in results.items():
        if ids != reference:
            raise AssertionError(f"{name} disagrees with ProtoBase on {pair}: {len(ids)} vs {len(reference)} records")


def run(
    records: int, repeats: int, cold_repeats: int, seed: int, command: str, doc: str | None, show_profile: bool
) -> int:
    info = machine()
    data = make_records(records, seed)
    base = tempfile.mkdtemp(prefix="protobase-queries-")
    pb_path = os.path.join(base, "protobase")
    databases: list[Any] = []  # everything to close, in order
    out: list[str] = []
    try:
        load_seconds: dict[str, float] = {}
        start = time.perf_counter()
        db = load_protobase(pb_path, data)
        databases.append(db)
        load_seconds["ProtoBase (async, + 2 indexes)"] = time.perf_counter() - start
        _progress(f"ProtoBase loaded in {load_seconds['ProtoBase (async, + 2 indexes)']:.1f} s")

        start = time.perf_counter()
        memory = load_sqlite(":memory:", data)
        databases.append(memory)
        load_seconds["SQLite memory"] = time.perf_counter() - start
        sqlite_path = os.path.join(base, "sqlite.db")
        start = time.perf_counter()
        load_sqlite(sqlite_path, data)
        load_seconds["SQLite file WAL"] = time.perf_counter() - start

        zodb_path = os.path.join(base, "zodb.fs")
        start = time.perf_counter()
        load_zodb(zodb_path, data)
        load_seconds["ZODB FileStorage"] = time.perf_counter() - start
        _progress("SQLite and ZODB loaded; cold queries")
        del data

        # cold: the first query on a freshly opened handle
        cold: dict[str, dict[tuple, float]] = {"ProtoBase": {}, "SQLite file WAL (dicts)": {}, "ZODB": {}}
        for pair in PAIRS:
            pb_cold, sqlite_cold, zodb_cold = [], [], []
            for _ in range(cold_repeats):
                fresh = protobase.open(pb_path, durability="async", shutdown_grace=0.2)
                try:
                    with fresh.snapshot() as snap:
                        pb_cold.append(timed(lambda s=snap, p=pair: pb_query(s.root["users"], *p))[0])
                finally:
                    fresh.close()
                conn = open_sqlite_file(sqlite_path)
                try:
                    sqlite_cold.append(timed(sqlite_dicts, conn, *pair)[0])
                finally:
                    conn.close()
                handle = ZodbHandle(zodb_path)
                try:
                    zodb_cold.append(timed(lambda h=handle, p=pair: zodb_values(h.tree, *p))[0])
                finally:
                    handle.close()
            cold["ProtoBase"][pair] = median(pb_cold)
            cold["SQLite file WAL (dicts)"][pair] = median(sqlite_cold)
            cold["ZODB"][pair] = median(zodb_cold)

        # warm handles
        _progress("warm rounds")
        snapshot = db.snapshot()
        databases.insert(0, snapshot)
        users = snapshot.root["users"]
        sqlite_file = open_sqlite_file(sqlite_path)
        databases.append(sqlite_file)
        zodb = ZodbHandle(zodb_path)
        databases.append(zodb)
        tree = zodb.tree
        for _ in tree.items():  # warm the connection cache by one pass
            pass
        for _ in users.values():  # the same courtesy for ProtoBase's caches
            pass
        for pair in PAIRS:
            sqlite_dicts(sqlite_file, *pair)

        methods: dict[str, Callable[[tuple], list]] = {
            "ProtoBase warm (same snapshot)": lambda p: pb_query(users, *p),
            "ProtoBase warm, memo cleared": lambda p: pb_query_cleared(users, *p),
            "ProtoBase keys only (memo cleared)": lambda p: pb_keys(users, *p),
            "ProtoBase full scan": lambda p: pb_scan(users, *p),
            "SQLite memory (dicts)": lambda p: sqlite_dicts(memory, *p),
            "SQLite file WAL (dicts)": lambda p: sqlite_dicts(sqlite_file, *p),
            "SQLite memory (dicts, tags json.loads)": lambda p: sqlite_dicts_json(memory, *p),
            "SQLite memory (raw tuples)": lambda p: sqlite_tuples(memory, *p),
            "SQLite file WAL (raw tuples)": lambda p: sqlite_tuples(sqlite_file, *p),
            "ZODB OOBTree values()": lambda p: zodb_values(tree, *p),
        }
        counts: dict[tuple, int] = {}
        for pair in PAIRS:
            found = {
                "ProtoBase": _ids(pb_query(users, *pair)),
                "ProtoBase memo cleared": _ids(pb_query_cleared(users, *pair)),
                "full scan": _ids(pb_scan(users, *pair)),
                "keys": sorted(int(key[4:]) for key in pb_keys(users, *pair)),
                "SQLite dicts": _ids(sqlite_dicts(memory, *pair)),
                "SQLite tuples": _ids(sqlite_tuples(sqlite_file, *pair)),
                "ZODB": _ids(zodb_values(tree, *pair)),
            }
            _check(found, pair)
            counts[pair] = len(found["ProtoBase"])

        times: dict[str, dict[tuple, list[float]]] = {name: {pair: [] for pair in PAIRS} for name in methods}
        names = list(methods)
        gc.collect()
        for round_number in range(repeats):
            order = names[round_number % len(names) :] + names[: round_number % len(names)]  # rotate
            for pair in PAIRS:
                for name in order:
                    times[name][pair].append(timed_per_call(methods[name], pair))

        warm = {name: {pair: median(values) for pair, values in by_pair.items()} for name, by_pair in times.items()}

        plans = {pair: users.where((F.city == pair[0]) & (F.score > pair[1])).explain() for pair in PAIRS}

        # targets
        verdicts: list[tuple[str, tuple, float, float, bool]] = []  # (what, pair, ratio, target, met)
        for pair in PAIRS:
            best_sqlite = min(warm["SQLite memory (dicts)"][pair], warm["SQLite file WAL (dicts)"][pair])
            for variant in ("ProtoBase warm (same snapshot)", "ProtoBase warm, memo cleared"):
                mine = warm[variant][pair]
                short = "warm" if "same" in variant else "memo cleared"
                for what, reference, target in (
                    ("vs full scan", warm["ProtoBase full scan"][pair], SCAN_TARGET),
                    ("vs SQLite dicts (faster of memory/file)", best_sqlite, SQLITE_TARGET),
                    ("vs ZODB", warm["ZODB OOBTree values()"][pair], ZODB_TARGET),
                ):
                    ratio = reference / mine
                    verdicts.append((f"{short} {what}", pair, ratio, target, ratio >= target))
        missed = [v for v in verdicts if not v[4]]

        profile_text = ""
        if missed or show_profile:
            for city, score in PAIRS:
                profile_text += f"cProfile of 20 warm queries (memo cleared), X={city!r}, Y={score}:\n"
                profile_text += profile_query(users, city, score, 20) + "\n\n"

        out.extend(
            _report(
                info,
                command,
                records,
                repeats,
                cold_repeats,
                seed,
                load_seconds,
                counts,
                warm,
                cold,
                plans,
                sqlite_plan(memory),
                verdicts,
                profile_text,
            )
        )
    finally:
        for handle in databases:
            handle.close()
        unserved = DataDir(pb_path).wait_until_unserved(timeout=30.0) if os.path.isdir(pb_path) else True
        shutil.rmtree(base, ignore_errors=True)
    text = "\n".join(out)
    print(text)
    if not unserved:
        print("warning: the coordinator did not exit within 30 s", file=sys.stderr)
    if doc is not None:
        replace_section(doc, SECTION, text)
        print(f"\nwritten into {doc}")
    return 0


def _report(
    info: dict,
    command: str,
    records: int,
    repeats: int,
    cold_repeats: int,
    seed: int,
    load_seconds: dict[str, float],
    counts: dict[tuple, int],
    warm: dict,
    cold: dict,
    plans: dict,
    sqlite_query_plan: str,
    verdicts: list,
    profile_text: str,
) -> list[str]:
    pair_names = [f"X={city}, Y={score} ({counts[(city, score)]:,} rows)" for city, score in PAIRS]
    out = [
        f"Command: `{command}`",
        "",
        f"Date: {info['date']}. Machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"load average at start {info['load']} (shared machine). {records:,} records, seed {seed}; "
        f"warm = median of {repeats} interleaved rounds, cold = median of {cold_repeats} fresh handles.",
        "",
        "Query: `(F.city == X) & (F.score > Y)`, matching records materialised as a list of dicts. "
        "Times in milliseconds (lower is better).",
        "",
        "| method | " + " | ".join(pair_names) + " |",
        "|---|" + "---:|" * len(PAIRS),
    ]
    for name, by_pair in warm.items():
        out.append(f"| {name} | " + " | ".join(_ms(by_pair[pair]) for pair in PAIRS) + " |")
    for name, by_pair in cold.items():
        out.append(
            f"| cold: {name}, first query on a fresh handle | "
            + " | ".join(_ms(by_pair[pair]) for pair in PAIRS)
            + " |"
        )
    out += [
        "",
        "Targets (ratio = reference time / ProtoBase time):",
        "",
        "| comparison | pair | ratio | target | met |",
        "|---|---|---:|---:|---|",
    ]
    for what, (city, score), ratio, target, met in verdicts:
        out.append(f"| {what} | {city}, >{score} | {ratio:.2f}x | >= {target:g}x | {'yes' if met else '**NO**'} |")
    missed = [v for v in verdicts if not v[4]]
    out += ["", f"Targets missed: {len(missed)} of {len(verdicts)}." if missed else "Every target met.", ""]
    out += ["Plans (`explain()`):", ""]
    for (city, score), text in plans.items():
        out += [f"X={city}, Y={score}:", "", "```", text, "```", ""]
    out += [f"SQLite plan: `{sqlite_query_plan}`", ""]
    out += ["Load times (s): " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in load_seconds.items()), ""]
    if profile_text:
        out += ["```", profile_text.rstrip(), "```", ""]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.queries", description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=DEFAULT_RECORDS)
    parser.add_argument("--repeats", type=int, default=15, help="interleaved warm rounds (median)")
    parser.add_argument("--cold-repeats", type=int, default=3, help="fresh handles per pair for cold (median)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--doc", default=DOC, help="markdown file to write the results into")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave the doc alone")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the query even if targets are met")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.queries", *argv])
    return run(
        records=args.records,
        repeats=args.repeats,
        cold_repeats=args.cold_repeats,
        seed=args.seed,
        command=command,
        doc=None if args.no_doc else args.doc,
        show_profile=args.profile,
    )


if __name__ == "__main__":
    sys.exit(main())
