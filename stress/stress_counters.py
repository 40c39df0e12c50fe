"""Counter race stress test: N processes increment shared counters; no increment may be lost.

Each worker process opens the database and, until it has made `--increments`
increments or `--seconds` have passed, increments one shared counter
(root["counters"]["total"], a hot key every worker writes) and its own
counter (root["per_worker"][name], a key nobody else writes) in one
transaction retried on conflict. Every worker reports how many increments it
committed. The invariant: the shared counter equals the sum of the reports,
and each worker's own counter equals its report. A mismatch exits 1.

    python stress/stress_counters.py --processes 8 --increments 5000 --seconds 60
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import protobase
from protobase.core.datadir import DataDir

RETRIES = 1_000_000
GRACE = 0.1  # seconds the coordinator lingers once every process closed the database


def worker(path: str, name: str, increments: int, seconds: float, barrier, results) -> None:
    try:
        with protobase.open(path, shutdown_grace=GRACE) as db:

            @db.transactional(retries=RETRIES)
            def bump(tx: protobase.Transaction) -> None:
                tx.root["counters"]["total"] += 1
                tx.root["per_worker"][name] += 1

            barrier.wait()
            stop_at = time.monotonic() + seconds
            done = 0
            while done < increments and time.monotonic() < stop_at:
                bump()
                done += 1
            results.put((name, done, None))
    except BaseException as error:  # report, so the parent does not wait forever
        results.put((name, 0, f"{type(error).__name__}: {error}"))
        raise


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=4, help="worker processes (default 4)")
    parser.add_argument("--increments", type=int, default=1000, help="increments per worker at most (default 1000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="stop each worker after this long (default 30)")
    parser.add_argument("--path", help="data directory (default: a fresh temporary one, removed afterwards)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    temporary = None if args.path else tempfile.mkdtemp(prefix="protobase-stress-")
    path = args.path or os.path.join(temporary, "db")
    names = [f"w{i}" for i in range(args.processes)]
    context = multiprocessing.get_context("spawn")
    started = time.monotonic()
    try:
        with protobase.open(path, shutdown_grace=GRACE) as db:
            with db.transaction() as tx:
                tx.root["counters"] = {"total": 0}
                tx.root["per_worker"] = dict.fromkeys(names, 0)
            barrier, results = context.Barrier(args.processes), context.Queue()
            processes = [
                context.Process(target=worker, args=(path, name, args.increments, args.seconds, barrier, results))
                for name in names
            ]
            for process in processes:
                process.start()
            reports = {}
            errors = []
            for _ in processes:
                name, done, error = results.get(timeout=args.seconds + 600)
                reports[name] = done
                if error:
                    errors.append(f"{name}: {error}")
            for process in processes:
                process.join(60)
            elapsed = time.monotonic() - started
            with db.snapshot() as snap:
                total = snap.root["counters"]["total"]
                per_worker = dict(snap.root["per_worker"])
            stats = db.stats()
            db.check()
    finally:
        if temporary:
            DataDir(os.path.abspath(path)).wait_until_unserved()  # let the coordinator finish before removal
            shutil.rmtree(temporary, ignore_errors=True)

    expected = sum(reports.values())
    print(
        f"{args.processes} processes, {expected} increments committed in {elapsed:.1f}s "
        f"({expected / elapsed:.0f}/s), {stats.conflicts} conflicts retried"
    )
    print(f"shared counter: {total} (expected {expected})")
    problems = list(errors)
    if total != expected:
        problems.append(
            f"shared counter is {total}, the workers committed {expected}: {expected - total} increments lost"
        )
    problems += [
        f"{name}'s counter is {per_worker.get(name)}, it committed {done}"
        for name, done in reports.items()
        if per_worker.get(name) != done
    ]
    problems += [f"worker {p.pid} exited with {p.exitcode}" for p in processes if p.exitcode != 0]
    for problem in problems:
        print(f"MISMATCH: {problem}", file=sys.stderr)
    print("FAIL" if problems else "OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
