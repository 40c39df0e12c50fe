"""`protobase bench`: a quick benchmark of point reads and commits in a temporary directory.

Runs in the process of the command, with a coordinator it starts for the
temporary database. Invariant: everything it creates (the directory, the
coordinator, its segments) is gone when it returns, whatever happened.
For the full benchmarks, see `python -m benchmarks`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any, Literal

from protobase.database import Database

__all__ = ["bench"]


def _rate(seconds: float, step: Callable[[], int]) -> float:
    """Operations per second of `step` (which returns how many it did) run for `seconds`."""
    done = 0
    started = time.perf_counter()
    deadline = started + max(seconds, 0.01)
    while True:
        done += step()
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - started)


def bench(args: argparse.Namespace) -> int:
    """`protobase bench [--seconds N] [--keys N]`: print reads and commits per second."""
    import random
    import shutil
    import tempfile

    import protobase

    directory = tempfile.mkdtemp(prefix="protobase-bench-")
    path = os.path.join(directory, "db")
    keys = [f"k{i}" for i in range(max(args.keys, 1))]
    plain = {key: {"n": i, "name": key} for i, key in enumerate(keys)}
    sample = [random.Random(7).choice(keys) for _ in range(1000)]
    print(f"bench: {len(keys):,} records, {args.seconds}s per measurement, in {path}", file=sys.stderr)
    try:
        db = protobase.open(path, shutdown_grace=0.05)
        try:
            with db.transaction() as tx:
                tx.root["items"] = plain
                tx.root["counter"] = 0
            snap_rate, dict_rate = _read_rates(db, plain, sample, args.seconds)
            sync_rate = _rate(args.seconds, _commits(db, "sync"))
            async_rate = _rate(args.seconds, _commits(db, "async"))
        finally:
            db.close()
        db.datadir.wait_until_unserved()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"point reads, snapshot:  {snap_rate:14,.0f} /s  ({snap_rate / dict_rate:.2f}x a plain dict)")
    print(f"point reads, dict:      {dict_rate:14,.0f} /s")
    print(f"commits, sync:          {sync_rate:14,.0f} /s")
    print(f"commits, async:         {async_rate:14,.0f} /s  ({async_rate / sync_rate:.1f}x sync)")
    return 0


def _read_rates(db: Database, plain: dict[str, Any], sample: list[str], seconds: float) -> tuple[float, float]:
    """Point reads per second of the keys `sample` through a snapshot of root["items"], and of the dict `plain`."""

    def dict_reads() -> int:
        for key in sample:
            plain[key]
        return len(sample)

    with db.snapshot() as snapshot:
        items = snapshot.root["items"]

        def snapshot_reads() -> int:
            for key in sample:
                items[key]
            return len(sample)

        snapshot_reads()  # warm the caches, as a long-running reader has them
        snap_rate = _rate(seconds, snapshot_reads)
    dict_rate = _rate(seconds, dict_reads)
    return snap_rate, dict_rate


def _commits(db: Database, durability: Literal["sync", "async"]) -> Callable[[], int]:
    """A step for `_rate`: one transaction incrementing root["counter"] with `durability`."""

    def step() -> int:
        with db.transaction(durability=durability) as tx:
            tx.root["counter"] += 1
        return 1

    return step
