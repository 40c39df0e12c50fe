"""`python -m benchmarks.hotkey`: one hot key bumped from several processes (issue 12 lever 9, issue 13).

Each of `--processes` spawned processes runs `--transactions` transactions
that add 1 to one key, released together: as a read-modify-write in
`db.attempts` (`tx.root["counter"] += 1`, every concurrent one conflicting)
and as `tx.root.incr("counter")` (conflict-free), each with durability "sync"
and "async"; beside them Redis INCR from as many processes (appendfsync
always / everysec), the peer issue 13 names. Reported per run: transactions/s
(all processes together), attempts per transaction and the longest run of
conflicts one transaction lost before it committed; the table shows the
median of `--rounds` rounds, and the counter is checked (no update lost).

On a checkout without `incr` (before it existed) the incr rows are skipped, so
the same command measures the old code: run it there for a before/after.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import sys
import tempfile
import time
from typing import Any

from .adapters.redis_store import Redis
from .common import machine, median, temporary_directory, wait_for_coordinator_exit

SPAWN = multiprocessing.get_context("spawn")
KINDS = ("rmw", "incr")


def _protobase_worker(path: str, kind: str, durability: str, transactions: int, barrier: Any, results: Any) -> None:
    import protobase

    with protobase.open(path, durability=durability, shutdown_grace=0.5) as db:
        losses = []
        barrier.wait(120)
        for _ in range(transactions):
            attempts = 0
            for attempt in db.attempts(retries=100_000):
                attempts += 1
                with attempt as tx:
                    if kind == "incr":
                        tx.root.incr("counter")
                    else:
                        tx.root["counter"] = tx.root["counter"] + 1
            losses.append(attempts - 1)
        results.put((time.perf_counter(), losses))


def _redis_worker(port: int, transactions: int, barrier: Any, results: Any) -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    barrier.wait(120)
    for _ in range(transactions):
        r.incr("counter")
    results.put((time.perf_counter(), [0] * transactions))
    r.close()


def _race(target: Any, args: tuple[Any, ...], processes: int, transactions: int) -> tuple[float, list[int]]:
    """Start `processes` workers, release them together; (transactions/s, every transaction's losses)."""
    barrier, results = SPAWN.Barrier(processes + 1), SPAWN.Queue()
    workers = [SPAWN.Process(target=target, args=(*args, transactions, barrier, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    try:
        barrier.wait(120)
        started = time.perf_counter()
        reports = [results.get(timeout=600) for _ in workers]
    finally:
        for worker in workers:
            worker.join(60)
            if worker.is_alive():
                worker.kill()
                worker.join()
    ended = max(report[0] for report in reports)
    return processes * transactions / (ended - started), [loss for report in reports for loss in report[1]]


def run_protobase(tmp: str, kind: str, durability: str, args: argparse.Namespace) -> dict[str, float] | None:
    import protobase
    from protobase.client.txvalues import TxDict

    path = os.path.join(tmp, f"{kind}-{durability}-{time.monotonic_ns()}")
    with protobase.open(path, durability="async", shutdown_grace=0.5) as db:
        if kind == "incr" and not hasattr(TxDict, "incr"):
            return None  # a checkout from before incr
        with db.transaction() as tx:
            tx.root["counter"] = 0
        rate, losses = _race(_protobase_worker, (path, kind, durability), args.processes, args.transactions)
        with db.snapshot() as snapshot:
            assert snapshot.root["counter"] == args.processes * args.transactions, "an update was lost"
    wait_for_coordinator_exit(path)
    return {"rate": rate, "attempts": 1 + sum(losses) / len(losses), "longest": max(losses)}


def run_redis(tmp: str, durable: bool, args: argparse.Namespace) -> dict[str, float]:
    import redis

    server = Redis()
    server.tmp = tempfile.mkdtemp(prefix="redis-", dir=tmp)  # its own: an old append-only file would load
    try:
        server.start(server.tmp)
        server.set_mode("durable" if durable else "relaxed")
        rate, _ = _race(_redis_worker, (server.port,), args.processes, args.transactions)
        r = redis.Redis(host="127.0.0.1", port=server.port)
        assert int(r.get("counter") or 0) == args.processes * args.transactions, "an update was lost"
        r.close()
    finally:
        server.stop()
    return {"rate": rate, "attempts": 1.0, "longest": 0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hotkey", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--transactions", type=int, default=200, help="per process")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    info = machine()
    print(f"# one hot key, {args.processes} processes x {args.transactions} transactions, {args.rounds} rounds")
    print(f"# {info['cpu']}, Python {info['python']}, load {info['load']}")
    print(f"# command: {shlex.join(['python', '-m', 'benchmarks.hotkey', *sys.argv[1:]])}")
    measured: dict[tuple[str, str], list[dict[str, float]]] = {}
    with temporary_directory("protobase-hotkey-") as tmp:
        for _ in range(args.rounds):
            for durability, redis_mode in (("sync", "always"), ("async", "everysec")):
                for kind in KINDS:
                    result = run_protobase(tmp, kind, durability, args)
                    if result is not None:
                        measured.setdefault((durability, f"ProtoBase {kind}"), []).append(result)
                label = f"Redis INCR ({redis_mode})"
                measured.setdefault((durability, label), []).append(run_redis(tmp, redis_mode == "always", args))
    print()
    print("| durability | store | transactions/s | vs Redis INCR | attempts/transaction | longest losing run |")
    print("|---|---|---:|---:|---:|---:|")
    for (durability, label), runs in measured.items():
        redis_runs = next(r for (d, name), r in measured.items() if d == durability and name.startswith("Redis"))
        ratio = median([run["rate"] / peer["rate"] for run, peer in zip(runs, redis_runs)])
        print(
            f"| {durability} | {label} | {median([r['rate'] for r in runs]):,.0f} | {ratio:.2f}x "
            f"| {median([r['attempts'] for r in runs]):.2f} | {max(r['longest'] for r in runs):.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
