"""The coordinator's cyclic-GC pauses under a large database: `python -m benchmarks gcpauses`.

Loads `--records` records (`record(i)` of common.py, 1,000,000 by default)
into `root["users"]` in transactions of 10,000, then runs `--commits`
single-key commits from one client, each overwriting a random record, and
reports the commit latency (p50, p99, p99.9, max, measured in the client)
with the coordinator's collector counters (`gc_pauses`, `gc_longest_pause_ms`,
`gc_pause_total_ms` of `db.stats()`).

It runs twice, each time with its own database and coordinator: "before",
with `PROTOBASE_GC=default` in the coordinator's environment (CPython's own
collector policy, as before protobase/collector.py), and "after", with the
policy. The client turns its own collector off for the timed commits (they
make no cycles), so the latencies show the coordinator.

It prints; nothing is asserted.
"""

from __future__ import annotations

import gc
import os
import random
import sys
import time
from typing import Any

from protobase.collector import POLICY_ENV

from .common import key_of, machine, percentile, record, temporary_directory
from .durability import close_and_wait

__all__ = ["run", "DEFAULT_RECORDS", "DEFAULT_COMMITS"]

DEFAULT_RECORDS = 1_000_000
DEFAULT_COMMITS = 20_000
BATCH = 10_000  # records per loading transaction
SEED = 20261202
POLICIES = {"before": "default", "after": ""}  # {label -> PROTOBASE_GC for the coordinator}


def load(db: Any, records: int) -> float:
    """Put `records` records into root["users"]; the seconds it took."""
    started = time.perf_counter()
    with db.transaction(durability="async") as tx:
        tx.root["users"] = {}
    for first in range(0, records, BATCH):
        with db.transaction(durability="async") as tx:
            users = tx.root["users"]
            for i in range(first, min(records, first + BATCH)):
                users[key_of(i)] = record(i)
    return time.perf_counter() - started


def commits(db: Any, records: int, count: int, durability: str) -> list[float]:
    """The latency in seconds of each of `count` single-key commits overwriting a random record."""
    rng = random.Random(SEED)
    latencies = []
    for n in range(count):
        i = rng.randrange(records)
        started = time.perf_counter()
        with db.transaction(durability=durability) as tx:
            tx.root["users"][key_of(i)] = {**record(i), "score": n}
        latencies.append(time.perf_counter() - started)
    return latencies


def one_run(label: str, records: int, count: int, durability: str) -> dict[str, Any]:
    """Load and commit on a fresh database served with the collector policy of `label`."""
    import protobase

    previous = os.environ.get(POLICY_ENV)
    os.environ[POLICY_ENV] = POLICIES[label]  # the coordinator that open() starts inherits it
    try:
        with temporary_directory("protobase-gcpauses-") as tmp:
            db = protobase.open(f"{tmp}/db", shutdown_grace=0.2)
            try:
                loaded = load(db, records)
                after_load = db.stats()
                gc.collect()
                gc.disable()  # the client's own pauses are not the coordinator's (its commits make no cycles)
                try:
                    latencies = commits(db, records, count, durability)
                finally:
                    gc.enable()
                end = db.stats()
            finally:
                close_and_wait(db)
    finally:
        if previous is None:
            del os.environ[POLICY_ENV]
        else:
            os.environ[POLICY_ENV] = previous
    return {
        "label": label,
        "load_seconds": loaded,
        "latencies": latencies,
        "load_longest_ms": after_load.gc_longest_pause_ms,
        "longest_ms": end.gc_longest_pause_ms,
        "pauses": end.gc_pauses - after_load.gc_pauses,
        "pause_ms": end.gc_pause_total_ms - after_load.gc_pause_total_ms,
        "compactions": end.compactions - after_load.compactions,
        "checkpoints": end.checkpoints - after_load.checkpoints,
        "slowest": sorted(range(len(latencies)), key=latencies.__getitem__)[-5:],
    }


def report(result: dict[str, Any]) -> str:
    """One line per run: latencies in ms, and what the coordinator's collector did."""
    lat = result["latencies"]
    ms = [value * 1e3 for value in lat]
    count = len(lat)
    return (
        f"{result['label']:>6}: load {result['load_seconds']:.0f} s; {count:,} commits: "
        f"p50 {percentile(ms, 0.5):.3f} ms, p99 {percentile(ms, 0.99):.3f} ms, "
        f"p99.9 {percentile(ms, 0.999):.3f} ms, max {max(ms):.1f} ms, "
        f"{sum(value > 10 for value in ms)} over 10 ms; "
        f"coordinator GC: longest pause {result['longest_ms']:.1f} ms since start "
        f"({result['load_longest_ms']:.1f} ms by the end of the load), "
        f"{result['pauses']:,} collections during the commits, "
        f"{result['pause_ms'] * 1e3 / count:.0f} us per commit; "
        f"{result['compactions']} compactions and {result['checkpoints']} checkpoints during the commits "
        f"(the slowest commits: numbers {', '.join(map(str, sorted(result['slowest'])))})"
    )


def run(records: int, count: int, durability: str, only: list[str] | None = None) -> int:
    """Run "before" and "after" (or the labels in `only`) and print them."""
    info = machine()
    print(
        f"gcpauses: {records:,} records, {count:,} {durability} commits; {info['nproc']} CPUs, "
        f"{info['cpu']}, Python {info['python']}, load {info['load']}"
    )
    for label in only or list(POLICIES):
        print(report(one_run(label, records, count, durability)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run(DEFAULT_RECORDS, DEFAULT_COMMITS, "async"))
