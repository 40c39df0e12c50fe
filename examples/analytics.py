"""Parallel analytics over one consistent snapshot, while a writer keeps committing.

What it shows: `db.pool(processes=N)` runs a function in N worker processes
that all read the same snapshot, straight from shared memory (only shard
names and small per-shard totals cross process boundaries). A writer process
commits new orders during the whole computation; the totals still describe
exactly one commit, whose seq every task reports.

Orders live in shards, `root["orders"][shard][order_id] = {"city", "amount",
"day"}` (amounts in cents, so sums are exact). The job maps `city_totals`
over the shard names, plus one extra task that computes the totals of all
shards in a single pass. Every item of one `pool.map` call reads the same
snapshot, so the merged per-shard totals must equal the single pass, and
all tasks must report the same seq: the example checks both, prints the
per-city table, the seq used and how far the writer got meanwhile, and exits
1 if a check fails.

Run it (from the repository root):

    python -m examples.analytics --orders 100000 --processes 2

Without --path it works in a temporary directory, removed at the end; it
stops the writer and the pool, and waits for the coordinator to exit.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Any

import protobase
from protobase.core.datadir import DataDir

CITIES = ["Paris", "Lyon", "Marseille", "Lille", "Nantes", "Bordeaux", "Toulouse", "Nice", "Rennes", "Dijon"]
SHARDS = [f"s{number:02}" for number in range(32)]
ALL = "*"  # the item whose task computes every shard in one pass
LOAD_BATCH = 10_000  # orders per loading transaction
WRITER_BATCH = 20  # orders per writer transaction
SHUTDOWN_GRACE = 0.2
START_TIMEOUT = 120.0


def make_order(rng: random.Random) -> dict:
    return {"city": rng.choice(CITIES), "amount": rng.randint(100, 50_000), "day": rng.randint(1, 365)}


def load_orders(db: protobase.Database, count: int, seed: int) -> None:
    """Commit `count` synthetic orders, LOAD_BATCH per transaction, spread over SHARDS."""
    rng = random.Random(seed)
    with db.transaction() as tx:
        tx.root["orders"] = {shard: {} for shard in SHARDS}
    for start in range(0, count, LOAD_BATCH):
        with db.transaction() as tx:
            orders = tx.root["orders"]
            for number in range(start, min(count, start + LOAD_BATCH)):
                orders[SHARDS[number % len(SHARDS)]][f"o{number:08}"] = make_order(rng)


def writer_main(path: str, seed: int, started: Any, stop: Any, written: Any) -> None:
    """A separate process: commit new orders into random shards until told to stop."""
    rng = random.Random(seed)
    with protobase.open(path, durability="async") as db:
        number = 0
        while not stop.is_set():
            with db.transaction() as tx:
                orders = tx.root["orders"]
                for _ in range(WRITER_BATCH):
                    orders[rng.choice(SHARDS)][f"w{number:08}"] = make_order(rng)
                    number += 1
            written.value = number
            started.set()


def city_totals(snapshot: protobase.Snapshot, shard: str) -> tuple[int, dict[str, list[int]]]:
    """(seq read, {city -> [orders, amount]}) for one shard, or for all of them when shard is ALL."""
    shards = SHARDS if shard == ALL else [shard]
    totals: dict[str, list[int]] = {}
    orders = snapshot.root["orders"]
    for name in shards:
        for order in orders[name].values():
            total = totals.setdefault(order["city"], [0, 0])
            total[0] += 1
            total[1] += order["amount"]
    return snapshot.seq, totals


def merge(parts: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    merged: dict[str, list[int]] = {}
    for part in parts:
        for city, (count, amount) in part.items():
            total = merged.setdefault(city, [0, 0])
            total[0] += count
            total[1] += amount
    return merged


def run(path: str, orders: int, processes: int, seed: int = 1) -> dict:
    """Load, start the writer, compute in the pool, stop everything; return what was measured."""
    context = multiprocessing.get_context("spawn")
    started, stop, written = context.Event(), context.Event(), context.Value("q", 0)
    with protobase.open(path, durability="async", shutdown_grace=SHUTDOWN_GRACE) as db:
        began = time.perf_counter()
        load_orders(db, orders, seed)
        loaded = time.perf_counter() - began
        writer = context.Process(
            target=writer_main, args=(path, seed + 1, started, stop, written), name="analytics-writer"
        )
        writer.start()
        try:
            if not started.wait(START_TIMEOUT):
                raise RuntimeError(f"the writer process committed nothing within {START_TIMEOUT}s")
            with db.pool(processes=processes) as pool:
                before = written.value
                began = time.perf_counter()
                results = pool.map(city_totals, SHARDS + [ALL], chunksize=1)
                computed = time.perf_counter() - began
                during = written.value - before
        finally:
            stop.set()
            writer.join()
        with db.snapshot() as latest:
            latest_seq = latest.seq
            latest_orders = sum(len(shard) for shard in latest.root["orders"].values())
    *per_shard, (single_seq, single) = results
    return {
        "seqs": {seq for seq, _ in results},
        "seq": single_seq,
        "parallel": merge([t for _, t in per_shard]),
        "single": single,
        "latest_seq": latest_seq,
        "latest_orders": latest_orders,
        "writer_orders_during": during,
        "writer_orders": written.value,
        "writer_exit": writer.exitcode,
        "load_seconds": loaded,
        "compute_seconds": computed,
    }


def report(result: dict, processes: int) -> bool:
    """Print the table and the checks; True when every check passed."""
    parallel, single = result["parallel"], result["single"]
    snapshot_orders = sum(count for count, _ in parallel.values())
    print(f"{'city':<10} {'orders':>8} {'total (EUR)':>14}")
    for city in sorted(parallel, key=lambda name: -parallel[name][1]):
        count, amount = parallel[city]
        print(f"{city:<10} {count:>8} {amount / 100:>14,.2f}")
    print(
        f"snapshot seq {result['seq']}: {snapshot_orders} orders, computed by {processes} processes "
        f"in {result['compute_seconds']:.2f}s (loading took {result['load_seconds']:.2f}s)"
    )
    print(
        f"meanwhile the writer committed {result['writer_orders_during']} orders; at the end: "
        f"seq {result['latest_seq']}, {result['latest_orders']} orders"
    )
    checks = {
        "every task read the same snapshot": len(result["seqs"]) == 1,
        "parallel totals equal a single pass over that snapshot": parallel == single,
        "the writer exited cleanly": result["writer_exit"] == 0,
    }
    for name, passed in checks.items():
        print(f"{'ok  ' if passed else 'FAIL'} {name}")
    return all(checks.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=100_000, help="synthetic orders to load")
    parser.add_argument("--processes", type=int, default=2, help="pool worker processes")
    parser.add_argument("--path", help="data directory (default: a temporary one, removed at the end)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    base = None if args.path else tempfile.mkdtemp(prefix="protobase-analytics-")
    path = args.path or f"{base}/db"
    try:
        result = run(path, args.orders, args.processes, args.seed)
        ok = report(result, args.processes)
    finally:
        if os.path.isdir(path) and not DataDir(path).wait_until_unserved(timeout=30):
            print(f"warning: the coordinator of {path} is still running (another client attached?)")
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
