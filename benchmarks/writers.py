"""Commit throughput from 1 and 8 writer processes: `python -m benchmarks.writers [options]`.

Issue 12's commit targets, measured in one run as ratios against the peers:
relaxed single-key commits from 1 and 8 processes (ProtoBase `async`, SQLite
WAL `synchronous=NORMAL`, LMDB `sync=False`, Redis `appendfsync everysec`) and
durable ones (ProtoBase `sync`, SQLite `FULL`, LMDB `sync=True`, Redis
`always`). Every writer runs the suite's W3 loop (benchmarks/workloads.py: one
`put` of a small record per transaction, its own 1,000 keys) in its own
spawned process, all released at once, for `--seconds`; the stores' rounds
are interleaved and repeated `--rounds` times, and each figure is the median
of its rounds. Ratios are ProtoBase over the peer (above 1.00x ProtoBase is
faster); for ProtoBase, how many commits the coordinator applied per group
(one write and publish) and per WAL fsync. Nothing is asserted; everything
started is stopped.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from .adapters import load_store
from .common import machine, median, percentile, temporary_directory
from .queries import make_records
from .suite import SEED
from .workloads import run_workers

STORES = [
    ("protobase_store", "ProtoBase"),
    ("sqlite_store", "Sqlite"),
    ("lmdb_store", "Lmdb"),
    ("redis_store", "Redis"),
]
WITHOUT_BUSY_POLL = ("protobase_store", "ProtoBaseWithoutBusyPoll")  # with --without-busy-poll
MODE_NAMES = {
    "ProtoBase": {"relaxed": "async", "durable": "sync"},
    "SQLite WAL": {"relaxed": "synchronous=NORMAL", "durable": "synchronous=FULL"},
    "LMDB": {"relaxed": "sync=False", "durable": "sync=True"},
    "Redis": {"relaxed": "appendfsync everysec", "durable": "appendfsync always"},
    "ProtoBase, busy_poll=0": {"relaxed": "async", "durable": "sync"},
}
TIMEOUT = 600.0


def _round(ref: tuple[str, str], store: Any, mode: str, writers: int, seconds: float) -> dict[str, float]:
    store.set_mode(mode)
    db = getattr(store, "db", None)  # ProtoBase's: how its commits grouped
    before = db.stats() if db is not None else None
    out = run_workers(ref, store.spec(), mode, "commits", writers, TIMEOUT, seconds=seconds, rate=None)
    latencies = [x for o in out for x in o["latencies"]]
    result = {"rate": sum(o["commits"] / o["seconds"] for o in out), "p99": percentile(latencies, 0.99)}
    if db is not None and before is not None:
        after = db.stats()
        commits = after.commits - before.commits
        result["per_group"] = commits / max(1, getattr(after, "commit_groups", 0) - getattr(before, "commit_groups", 0))
        result["per_sync"] = commits / max(1, after.wal_syncs - before.wal_syncs)
    return result


def run(
    writer_counts: list[int], modes: list[str], rounds: int, seconds: float, records: int, without_busy_poll: bool
) -> int:
    info = machine()  # the load average before the run
    started: list[tuple[tuple[str, str], Any]] = []
    results: dict[tuple[str, str, int], list[dict[str, float]]] = {}
    stores = [*STORES[:1], WITHOUT_BUSY_POLL, *STORES[1:]] if without_busy_poll else STORES
    with temporary_directory("pb-writers-") as tmp:
        try:
            for ref in stores:
                cls = load_store(*ref)
                store = cls()
                why = store.unavailable()
                if why:
                    print(f"{cls.name}: SKIPPED ({why})", flush=True)
                    continue
                store.seed, store.tmp = SEED, tmp
                store.start(tmp)
                started.append((ref, store))
                store.load(make_records(records, SEED))
            for repeat in range(rounds):
                for mode in modes:
                    for writers in writer_counts:
                        order = started[repeat % len(started) :] + started[: repeat % len(started)]
                        for ref, store in order:
                            if mode not in store.modes:
                                continue
                            result = _round(ref, store, mode, writers, seconds)
                            results.setdefault((store.name, mode, writers), []).append(result)
                            print(
                                f"  round {repeat + 1}: {store.name} {mode} x{writers}: {result['rate']:,.0f}/s",
                                flush=True,
                            )
        finally:
            for _, store in started:
                store.stop()
    _report(results, writer_counts, modes, rounds, seconds, info)
    return 0


def _report(results: dict, writer_counts: list[int], modes: list[str], rounds: int, seconds: float, info: dict) -> None:
    print(
        f"\n{info['date']}; {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, load average at start "
        f"{info['load']}; medians of {rounds} rounds of {seconds:g} s"
    )
    print(
        "| writers | mode | store (setting) | commits/s | p99 ms | ProtoBase / store | commits per group, per fsync |"
    )
    print("|---:|---|---|---:|---:|---:|---|")
    for mode in modes:
        for writers in writer_counts:
            ours = results.get(("ProtoBase", mode, writers))
            for (name, m, w), rows in results.items():
                if m != mode or w != writers:
                    continue
                rate = median([r["rate"] for r in rows])
                p99 = median([r["p99"] for r in rows]) * 1e3
                ratios = [o["rate"] / r["rate"] for o, r in zip(ours, rows)] if ours else []
                ratio = f"{median(ratios):.2f}x" if ratios and name != "ProtoBase" else ""
                setting = MODE_NAMES.get(name, {}).get(mode, mode)
                grouping = ""
                if "per_group" in rows[0]:
                    grouping = (
                        f"{median([r['per_group'] for r in rows]):.2f}, {median([r['per_sync'] for r in rows]):.2f}"
                    )
                print(f"| {writers} | {mode} | {name} ({setting}) | {rate:,.0f} | {p99:.2f} | {ratio} | {grouping} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.writers", description=__doc__)
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 8], help="writer processes per round")
    parser.add_argument("--modes", nargs="+", choices=("relaxed", "durable"), default=["relaxed", "durable"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one round")
    parser.add_argument("--records", type=int, default=20_000, help="records loaded first")
    parser.add_argument(
        "--without-busy-poll",
        action="store_true",
        help="also ProtoBase with busy_poll=0 (its ratio: what busy polling gains)",
    )
    args = parser.parse_args(argv)
    print("$", shlex.join(["python", "-m", "benchmarks.writers", *(sys.argv[1:] if argv is None else argv)]))
    return run(args.writers, args.modes, args.rounds, args.seconds, args.records, args.without_busy_poll)


if __name__ == "__main__":
    sys.exit(main())
