"""The coordinator's write path on an indexed collection: `python -m benchmarks.writer`.

What a commit into `users` (100,000 records, indexed on `city`, `score` and
`("city", "score")`, the records of benchmarks/queries.py) costs the
coordinator, the figures behind "What the profiles showed" in
docs/benchmarks.md:

1. encoding one index leaf of 64 composite entries `(0, (city, score), key)`:
   `codec.encode` against the writer's `codec.KeyMemo` the second time (what
   copying the leaf costs once its entries were written);
2. `db.compact()` of the whole database (the longest pause a commit meets);
3. inserting W3's records `{"id", "name", "city", "score", "tags"}` one per
   transaction from one client for `--seconds`, async then sync, with the
   coordinator's CPU time per commit (psutil) and the compactions that fell
   in the round.

It prints; nothing is asserted. Run it on two checkouts to compare them.
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit

import psutil

from protobase.core import codec

from .common import median, temporary_directory
from .durability import close_and_wait
from .queries import load_protobase, make_records


def leaf_encoding() -> dict[str, float]:
    leaf = [(0, (f"city{i % 20:02d}", i), f"user{i}") for i in range(64)]
    calls = {"encode": lambda: codec.encode([leaf])}
    if hasattr(codec, "KeyMemo"):  # a checkout from before 2026-11-27 has none
        memo = codec.KeyMemo()
        memo(leaf)  # the leaf was written once: its entries are remembered
        calls["memo"] = lambda: memo(leaf)
    return {name: min(timeit.repeat(call, number=200, repeat=5)) / 200 for name, call in calls.items()}


def inserts(db, coordinator: psutil.Process, mode: str, seconds: float) -> dict[str, float]:
    before_cpu, before = coordinator.cpu_times(), db.stats()
    began = time.perf_counter()
    deadline, commits = began + seconds, 0
    while time.perf_counter() < deadline:
        with db.transaction(durability=mode) as tx:
            tx.root["users"][f"w3-{mode}-{began}-{commits}"] = {
                "id": -1,
                "name": "w3",
                "city": "w3",
                "score": commits,
                "tags": [],
            }
        commits += 1
    elapsed = time.perf_counter() - began
    after_cpu, after = coordinator.cpu_times(), db.stats()
    cpu = (after_cpu.user + after_cpu.system) - (before_cpu.user + before_cpu.system)
    return {"rate": commits / elapsed, "cpu": cpu / commits, "compactions": after.compactions - before.compactions}


def run(records: int, seconds: float, repeats: int) -> None:
    encoding = leaf_encoding()
    memo = f"{encoding['memo'] * 1e3:.3f} ms" if "memo" in encoding else "n/a"
    print(
        f"index leaf of 64 composite entries: encode {encoding['encode'] * 1e3:.3f} ms, "
        f"KeyMemo after a first write {memo}"
    )
    with temporary_directory("protobase-writer-") as tmp:
        db = load_protobase(f"{tmp}/db", make_records(records, 1))
        try:
            pauses = []
            for _ in range(repeats):
                started = time.perf_counter()
                db.compact()
                pauses.append(time.perf_counter() - started)
            stats = db.stats()
            print(
                f"compaction of {records:,} indexed records ({stats.live_bytes / 2**20:.1f} MiB live): "
                f"median {median(pauses):.2f} s of {repeats}"
            )
            coordinator = psutil.Process(db.coordinator_pid)
            for mode in ("async", "sync"):
                rounds = [inserts(db, coordinator, mode, seconds) for _ in range(repeats)]
                print(
                    f"inserts, {mode}: {median([r['rate'] for r in rounds]):,.0f} commits/s, coordinator CPU "
                    f"{median([r['cpu'] for r in rounds]) * 1e6:,.0f} us per commit (median of {repeats} rounds "
                    f"of {seconds:g} s; compactions during them: {sum(r['compactions'] for r in rounds)})"
                )
        finally:
            close_and_wait(db)  # the coordinator gone before its directory is removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.writer", description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one round of inserts")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    run(args.records, args.seconds, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
