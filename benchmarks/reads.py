"""Point reads in a fresh reader process: `python -m benchmarks.reads`.

Issue 12's read targets, as ratios against peers measured in the same run:

* cold point reads in a fresh process >= 1x LMDB `txn.get` + `pickle.loads`;
* a fresh reader's private heap (USS growth) after 10,000 gets over 1M
  records <= 8 MB with the default cache;
* warm reads at least as fast as before (the same keys read again).

The parent loads `--records` records (benchmarks.common.record) into
ProtoBase's `root["users"]` (transactions of 10,000) and into LMDB (pickled,
one write transaction), then, for each of `--rounds` rounds and each store in
a rotating order, starts a fresh reader process that:

1. opens the store and takes its snapshot / read transaction, then measures
   its USS (psutil `memory_full_info().uss`: pages only it holds);
2. reads `["score"]` of `--gets` distinct random keys once: the *cold* pass
   (every get touches nodes and records this process never read);
3. measures its USS again: the growth is what those gets left in its heap;
4. reads `--gets` *other* distinct keys: the *tree-warm* pass (the branches
   and some leaves were read before, the records were not);
5. reads the first keys again, best of 20 passes: the *warm* pass (for
   ProtoBase the view's memo; for LMDB the OS page cache);
6. ProtoBase only: walks to the second keys again, with the compiled walk
   over the nodes' bytes and with the walk over decoded, cached nodes.

A plain dict of the same records, built in its reader process, gives the
warm floor. Medians of the rounds; ratios are ProtoBase's speed over the
other store's (above 1 ProtoBase is faster). It prints; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import subprocess
import sys
import time
from typing import Any

import psutil

from .common import key_of, median, record, temporary_directory, wait_for_coordinator_exit

BATCH = 10_000
WARM_PASSES = 20
STORES = ("ProtoBase", "LMDB", "dict")


def load_protobase(path: str, count: int) -> Any:
    """Open a database at `path` holding `count` records in root['users']; the handle keeps it alive."""
    import protobase

    db = protobase.open(path, durability="async", shutdown_grace=0.05)
    with db.transaction() as tx:
        tx.root["users"] = {}
    for first in range(0, count, BATCH):
        with db.transaction() as tx:
            users = tx.root["users"]
            for i in range(first, min(count, first + BATCH)):
                users[key_of(i)] = record(i)
    db.compact()  # as a long-running database is: one generation of live atoms
    return db


def load_lmdb(path: str, count: int) -> None:
    import lmdb

    env = lmdb.open(path, map_size=8 << 30, subdir=True, sync=False, metasync=False)
    try:
        with env.begin(write=True) as txn:
            for i in range(count):
                txn.put(key_of(i).encode(), pickle.dumps(record(i), protocol=pickle.HIGHEST_PROTOCOL))
        env.sync(True)
    finally:
        env.close()


def uss() -> float:
    return psutil.Process().memory_full_info().uss / 2**20


def timed_pass(get: Any, keys: list[str]) -> float:
    """Microseconds per get over `keys`, each read once."""
    return timed_passes(get, keys)[0]


def timed_passes(get: Any, keys: list[str]) -> tuple[float, float]:
    """(wall, CPU) microseconds per get over `keys`, each read once. The CPU time (user and system,
    page faults included) does not count the time another process held the CPU: on a loaded machine
    it is the steadier of the two."""
    start, cpu = time.perf_counter(), time.process_time()
    for key in keys:
        get(key)
    return (time.perf_counter() - start) / len(keys) * 1e6, (time.process_time() - cpu) / len(keys) * 1e6


def reader(store: str, path: str, count: int, gets: int, seed: int) -> dict[str, float]:
    """One fresh reader's figures (runs in the child process)."""
    sample = random.Random(seed).sample(range(count), 2 * gets)
    first = [key_of(i) for i in sample[:gets]]
    second = [key_of(i) for i in sample[gets:]]
    results: dict[str, float] = {}
    if store == "ProtoBase":
        import protobase

        with protobase.open(path, start_coordinator=False) as db, db.snapshot() as snapshot:
            users = snapshot.root["users"]
            len(users)  # the collection's root node, as any reader's first touch of it

            def get(key: str) -> Any:
                return users[key]["score"]

            results.update(measure(get, first, second))
            results.update(walks(db.session.store, users.ptr, second))
    elif store == "LMDB":
        import lmdb

        env = lmdb.open(path, readonly=True, lock=False, subdir=True)
        txn = env.begin()
        loads = pickle.loads

        def get(key: str) -> Any:
            return loads(txn.get(key.encode()))["score"]

        results.update(measure(get, first, second))
        txn.abort()
        env.close()
    else:
        data = {key_of(i): record(i) for i in range(count)}

        def get(key: str) -> Any:
            return data[key]["score"]

        results.update(measure(get, first, second))
    return results


def measure(get: Any, first: list[str], second: list[str]) -> dict[str, float]:
    before = uss()
    cold, cold_cpu = timed_passes(get, first)
    grown = uss() - before
    tree_warm, tree_warm_cpu = timed_passes(get, second)
    warm = min(timed_pass(get, first) for _ in range(WARM_PASSES))
    return {
        "cold us/get": cold,
        "cold CPU us/get": cold_cpu,
        "USS growth MiB": grown,
        "tree-warm us/get": tree_warm,
        "tree-warm CPU us/get": tree_warm_cpu,
        "warm us/get": warm,
    }


def walks(store: Any, root: int, keys: list[str]) -> dict[str, float]:
    """CPU us per walk from the collection's root to a key's slot, on nodes already read: the compiled
    walk over the encoded bytes against the walk over decoded, cached nodes (the first decoded pass
    decodes and caches them; the second is timed). Tells whether caching decoded nodes would help."""
    from protobase.core.arena import DICT_LEAF

    if not hasattr(store, "searcher"):  # a ProtoBase from before the compiled walk (a before/after run)
        return {}

    def per_walk(lookup: Any) -> float:
        start = time.process_time()
        for key in keys:
            lookup(root, key, DICT_LEAF)
        return (time.process_time() - start) / len(keys) * 1e6

    per_walk(store.access.lookup)
    return {
        "walk, bytes CPU us": per_walk(store.searcher.lookup),
        "walk, decoded CPU us": per_walk(store.access.lookup),
    }


def run_reader(store: str, path: str, count: int, gets: int, seed: int) -> dict[str, float]:
    command = [sys.executable, "-m", "benchmarks.reads", "--reader", store, path]
    command += ["--records", str(count), "--gets", str(gets), "--seed", str(seed)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(output.splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reads", description=__doc__)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--gets", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--reader", nargs=2, metavar=("STORE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reader:
        print(json.dumps(reader(args.reader[0], args.reader[1], args.records, args.gets, args.seed)))
        return 0

    from protobase.core import codec

    print(f"compiled core: {codec.COMPILED}; {args.records:,} records, {args.gets:,} gets, {args.rounds} rounds")
    samples: dict[str, dict[str, list[float]]] = {store: {} for store in STORES}
    with temporary_directory("protobase-bench-reads-") as tmp:
        pb_path, lmdb_path = os.path.join(tmp, "protobase"), os.path.join(tmp, "lmdb")
        start = time.perf_counter()
        db = load_protobase(pb_path, args.records)
        print(f"loaded ProtoBase in {time.perf_counter() - start:.1f} s", flush=True)
        try:
            start = time.perf_counter()
            load_lmdb(lmdb_path, args.records)
            print(f"loaded LMDB in {time.perf_counter() - start:.1f} s", flush=True)
            paths = {"ProtoBase": pb_path, "LMDB": lmdb_path, "dict": ""}
            for round_ in range(args.rounds):
                order = STORES[round_ % len(STORES) :] + STORES[: round_ % len(STORES)]
                for store in order:
                    result = run_reader(store, paths[store], args.records, args.gets, args.seed + round_)
                    for name, value in result.items():
                        samples[store].setdefault(name, []).append(value)
        finally:
            db.close()
            wait_for_coordinator_exit(pb_path)
    report(samples)
    return 0


def report(samples: dict[str, dict[str, list[float]]]) -> None:
    names = list(samples["ProtoBase"])
    print(f"\n{'median of rounds':22s}" + "".join(f"{store:>14s}" for store in STORES) + "   PB vs LMDB   PB vs dict")
    for name in names:
        values = {store: median(samples[store][name]) if name in samples[store] else None for store in STORES}
        row = f"{name:22s}" + "".join("{:>14s}".format(f"{v:.2f}" if v is not None else "-") for v in values.values())
        if name.endswith("us/get"):
            row += f"   {values['LMDB'] / values['ProtoBase']:9.2f}x   {values['dict'] / values['ProtoBase']:9.2f}x"
        print(row)


if __name__ == "__main__":
    sys.exit(main())
