"""The core-engine benchmark: `python -m benchmarks core`.

Measures, in one run, on records like record(i) in common.py:

1. reads: warm random point reads `snap.root["users"][key]["score"]` in a
   worker process (not the one that loaded the data), against a plain dict and
   LMDB (`pickle.loads(txn.get(key))["score"]`, one read transaction reused)
   measured in that same worker, interleaved repeat by repeat. Cold reads
   (the first pass after opening) are reported for information;
2. commits: single-key commits from one client, commits/s and round trips;
3. memory: shared bytes of a loaded and compacted database against the
   msgpack size of its records, and the USS growth of a second reader process
   that reads every record once (default cache, then a small cache).

Every number is a median of repeats or a ratio measured side by side in this
run; nothing is asserted. The report is a markdown table, printed and written
into docs/performance.md between `<!-- core:begin -->` and `<!-- core:end -->`.
"""

from __future__ import annotations

import cProfile
import gc
import io
import multiprocessing
import os
import pickle
import pstats
import random
import time
import traceback
from collections.abc import Callable
from typing import Any

from .common import (
    key_of,
    machine,
    median,
    percentile,
    record,
    replace_section,
    temporary_directory,
    wait_for_coordinator_exit,
)

__all__ = ["run", "DEFAULT_READ_RECORDS", "DEFAULT_MEMORY_RECORDS"]

DEFAULT_READ_RECORDS = 100_000
DEFAULT_MEMORY_RECORDS = 1_000_000
BATCH = 10_000  # records per loading transaction
# "async" is the closest to "in memory only": a commit returns once published in
# shared memory, the WAL is fsynced in the background. "sync" waits for the fsync.
DURABILITIES = ("async", "sync")
GRACE = 0.2  # seconds the benchmark's coordinators linger after the last client
WORKER_TIMEOUT = 1800.0  # seconds a worker process may take before we give up on it
SMALL_CACHE = 256  # object cache entries of the "zero-copy floor" reader: a few hundred decoded records (~0.3 MB)
SEED = 20240601

# targets: (metric, comparison, bound)
READ_TARGET = 2.0  # ProtoBase/LMDB warm reads, at least (aim: 3x)
READ_AIM = 3.0
MEMORY_TARGET = 1.5  # shared bytes / msgpack bytes, at most
READER_TARGET = 0.05  # second reader's USS growth / shared bytes, below


# -- the timed loops (identical shape for each store) ----------------------------------


def protobase_pass(snap: Any, keys: list) -> int:
    total = 0
    for key in keys:
        total += snap.root["users"][key]["score"]
    return total


def dict_pass(d: dict, keys: list) -> int:
    total = 0
    for key in keys:
        total += d["users"][key]["score"]
    return total


def lmdb_pass(txn: Any, keys: list) -> int:
    loads = pickle.loads
    total = 0
    for key in keys:
        total += loads(txn.get(key))["score"]
    return total


def timed(function: Callable, *args: Any) -> float:
    """Seconds one call takes, with the cyclic GC off (as timeit does)."""
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        function(*args)
        return time.perf_counter() - started
    finally:
        gc.enable()


# -- worker processes ----------------------------------------------------------------------


def _worker_main(conn: Any, task: str, kwargs: dict) -> None:
    try:
        result = {"reads": _reads_in_worker, "reader_memory": _reader_memory_in_worker}[task](**kwargs)
        conn.send(("ok", result))
    except BaseException:  # report anything to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def in_worker(task: str, **kwargs: Any) -> dict:
    """Run `task` in a fresh (spawned) process and return its result; always joins it."""
    context = multiprocessing.get_context("spawn")
    parent_end, child_end = context.Pipe(duplex=False)
    process = context.Process(target=_worker_main, args=(child_end, task, kwargs), name=f"bench-{task}")
    process.start()
    child_end.close()
    try:
        if not parent_end.poll(WORKER_TIMEOUT):
            raise RuntimeError(f"benchmark worker {task!r} sent nothing in {WORKER_TIMEOUT:.0f}s")
        status, result = parent_end.recv()
    except EOFError:
        status, result = "error", f"benchmark worker {task!r} died (exit code {process.exitcode})"
    finally:
        parent_end.close()
        process.join(30)
        if process.is_alive():
            process.terminate()
            process.join()
    if status != "ok":
        raise RuntimeError(f"benchmark worker {task!r} failed:\n{result}")
    return result


def _reads_in_worker(db_path: str, lmdb_path: str, records: int, repeats: int, seed: int) -> dict:
    import lmdb

    import protobase

    rng = random.Random(seed)
    keys = [key_of(i) for i in range(records)]
    sample = [keys[rng.randrange(records)] for _ in range(records)]
    sample_bytes = [key.encode() for key in sample]
    keys_bytes = [key.encode() for key in keys]
    # The same key objects as the lookups use, as in ProtoBase's memo: both get the identity fast path.
    plain = {"users": {key: record(i) for i, key in enumerate(keys)}}

    db = protobase.open(db_path, shutdown_grace=GRACE)
    env = lmdb.open(lmdb_path, readonly=True, subdir=True, max_readers=8)
    try:
        snap = db.snapshot()
        txn = env.begin()
        try:
            ops = len(sample)
            cold = {
                "protobase": ops / timed(protobase_pass, snap, sample),
                "lmdb": ops / timed(lmdb_pass, txn, sample_bytes),
            }
            # warm-up: every record once
            protobase_pass(snap, keys)
            lmdb_pass(txn, keys_bytes)
            dict_pass(plain, keys)
            assert protobase_pass(snap, sample) == dict_pass(plain, sample) == lmdb_pass(txn, sample_bytes)
            passes = {
                "protobase": lambda: timed(protobase_pass, snap, sample),
                "dict": lambda: timed(dict_pass, plain, sample),
                "lmdb": lambda: timed(lmdb_pass, txn, sample_bytes),
            }
            rates: dict[str, list[float]] = {name: [] for name in passes}
            order = list(passes)
            for repeat in range(repeats):
                for name in order[repeat % 3 :] + order[: repeat % 3]:  # rotate who runs first
                    rates[name].append(ops / passes[name]())
            profiler = cProfile.Profile()
            profiler.runcall(protobase_pass, snap, sample)
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
            cache = db.stats().object_cache
        finally:
            txn.abort()
            snap.close()
    finally:
        env.close()
        db.close()
    return {
        "ops": ops,
        "cold": cold,
        "rates": rates,
        "profile": text.getvalue(),
        "cache": {"entries": cache.entries, "capacity": cache.capacity, "hit_rate": cache.hit_rate},
    }


def _reader_memory_in_worker(db_path: str, records: int, cache_size: int | None) -> dict:
    import protobase
    from protobase.client.stats import process_uss

    keys = [key_of(i) for i in range(records)]
    options = {} if cache_size is None else {"cache_size": cache_size}
    db = protobase.open(db_path, shutdown_grace=GRACE, **options)
    try:
        gc.collect()
        before = process_uss()
        started = time.perf_counter()
        with db.snapshot() as snap:
            users = snap.root["users"]
            total = 0
            for key in keys:
                total += users[key]["score"]
            seconds = time.perf_counter() - started
            gc.collect()
            after = process_uss()
        cache = db.stats().object_cache
    finally:
        db.close()
    expected = sum(record(i)["score"] for i in range(records))
    if total != expected:
        raise AssertionError(f"reader summed {total}, expected {expected}")
    return {
        "uss_before": before,
        "uss_after": after,
        "seconds": seconds,
        "cache_entries": cache.entries,
        "cache_capacity": cache.capacity,
    }


# -- loading ---------------------------------------------------------------------------------


def load(db: Any, records: int, *, measure_msgpack: bool = False) -> int:
    """Write `records` records under root['users'] in batches; return their msgpack size if asked."""
    import msgpack

    with db.transaction() as tx:
        tx.root["users"] = {}
        tx.root["counter"] = 0
    packed = 0
    for start in range(0, records, BATCH):
        with db.transaction() as tx:
            users = tx.root["users"]
            for i in range(start, min(records, start + BATCH)):
                key, value = key_of(i), record(i)
                users[key] = value
                if measure_msgpack:
                    packed += len(msgpack.packb([key, value]))
    return packed


def close_and_wait(db: Any) -> None:
    """Close `db` and wait for its coordinator to exit (it unlinks its shared memory)."""
    path = db.path
    db.close()
    if not wait_for_coordinator_exit(path):
        raise RuntimeError(f"the coordinator of {path} did not exit after the benchmark closed it")


# -- the three benchmarks ---------------------------------------------------------------


def bench_reads(tmp: str, records: int, repeats: int) -> tuple[dict, Any]:
    """Load the read data set into ProtoBase and LMDB, then measure reads in a worker.

    Returns the results and the still-open database (the commit benchmark reuses it).
    """
    import lmdb

    import protobase

    db = protobase.open(os.path.join(tmp, "reads"), shutdown_grace=GRACE, durability="async")
    try:
        started = time.perf_counter()
        load(db, records)
        db.compact()
        load_seconds = time.perf_counter() - started
        lmdb_path = os.path.join(tmp, "lmdb")
        env = lmdb.open(lmdb_path, map_size=max(1 << 30, records * 512), subdir=True)
        try:
            with env.begin(write=True) as txn:
                for i in range(records):
                    txn.put(key_of(i).encode(), pickle.dumps(record(i), protocol=pickle.HIGHEST_PROTOCOL))
        finally:
            env.close()
        result = in_worker("reads", db_path=db.path, lmdb_path=lmdb_path, records=records, repeats=repeats, seed=SEED)
    except BaseException:
        close_and_wait(db)
        raise
    result["load_seconds"] = load_seconds
    return result, db


def bench_commits(db: Any, records: int, commits: int, rounds: int) -> dict:
    """Single-key commits from this process: a record field, then a top-level counter."""
    rng = random.Random(SEED + 1)
    per_round = max(1, commits // rounds)

    def score(durability: str) -> Callable[[int], None]:
        def commit(i: int) -> None:
            with db.transaction(durability=durability) as tx:
                tx.root["users"][key_of(rng.randrange(records))]["score"] = i

        return commit

    def counter(durability: str) -> Callable[[int], None]:
        def commit(i: int) -> None:
            with db.transaction(durability=durability) as tx:
                tx.root["counter"] = i

        return commit

    kinds = {
        f"{name} {durability}": make(durability)
        for durability in DURABILITIES
        for name, make in (("score", score), ("counter", counter))
    }
    for function in kinds.values():  # warm-up
        for i in range(min(50, per_round)):
            function(i)
    compactions_before = db.stats().compactions
    latencies: dict[str, list[float]] = {name: [] for name in kinds}
    rates: dict[str, list[float]] = {name: [] for name in kinds}
    for round_number in range(rounds):
        for name, function in kinds.items():
            lat = latencies[name]
            round_started = time.perf_counter()
            for i in range(round_number * per_round, (round_number + 1) * per_round):
                started = time.perf_counter()
                function(i)
                lat.append(time.perf_counter() - started)
            rates[name].append(per_round / (time.perf_counter() - round_started))
    stats = db.stats()
    return {
        "per_round": per_round,
        "rounds": rounds,
        "latencies": latencies,
        "rates": rates,
        "compactions": stats.compactions - compactions_before,
    }


def bench_memory(tmp: str, records: int) -> dict:
    import protobase

    db = protobase.open(os.path.join(tmp, "memory"), shutdown_grace=GRACE, durability="async")
    try:
        started = time.perf_counter()
        packed = load(db, records, measure_msgpack=True)
        load_seconds = time.perf_counter() - started
        db.compact()
        stats = db.stats()
        readers = {
            "default cache": in_worker("reader_memory", db_path=db.path, records=records, cache_size=None),
            f"cache_size={SMALL_CACHE}": in_worker(
                "reader_memory", db_path=db.path, records=records, cache_size=SMALL_CACHE
            ),
        }
    finally:
        close_and_wait(db)
    return {
        "records": records,
        "msgpack_bytes": packed,
        "shared_bytes": stats.shared_bytes,
        "live_bytes": stats.live_bytes,
        "data_bytes": stats.data_bytes,
        "segments": stats.segments,
        "load_seconds": load_seconds,
        "readers": readers,
    }


# -- reporting -----------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.1f} MiB"


def report(command: str, info: dict, reads: dict, commits: dict, memory: dict) -> tuple[str, list[str]]:
    """The markdown report and the list of missed targets."""
    missed = []
    rates = reads["rates"]
    pb, lm, dc = (median(rates[name]) for name in ("protobase", "lmdb", "dict"))
    vs_lmdb = median([a / b for a, b in zip(rates["protobase"], rates["lmdb"])])
    vs_dict = median([a / b for a, b in zip(rates["protobase"], rates["dict"])])
    repeats = len(rates["protobase"])
    if vs_lmdb < READ_TARGET:
        missed.append(f"warm reads: ProtoBase/LMDB = {vs_lmdb:.2f}x, target >= {READ_TARGET:g}x")
    lines = [
        f"Command: `{command}`  ",
        f"Date: {info['date']}; machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"load average at start {info['load']}.",
        "",
        f"### Reads ({reads['ops']:,} random point reads of {reads['ops']:,} records, worker process, "
        f"median of {repeats} interleaved repeats)",
        "",
        "| store | warm ops/s | ProtoBase / store (median of per-repeat ratios) | cold ops/s (first pass) |",
        "|---|---:|---:|---:|",
        f'| ProtoBase `snap.root["users"][key]["score"]` | {pb:,.0f} | 1.00x | {reads["cold"]["protobase"]:,.0f} |',
        f'| LMDB `pickle.loads(txn.get(k))["score"]` | {lm:,.0f} | **{vs_lmdb:.2f}x** '
        f"(target >= {READ_TARGET:g}x, aim {READ_AIM:g}x: {_verdict(vs_lmdb >= READ_TARGET)}) | "
        f"{reads['cold']['lmdb']:,.0f} |",
        f'| plain dict `d["users"][key]["score"]` | {dc:,.0f} | {vs_dict:.2f}x | - |',
        "",
        f"Worker object cache after the run: {reads['cache']['entries']:,} entries of "
        f"{reads['cache']['capacity']:,}, hit rate {reads['cache']['hit_rate']:.1%}.",
        "",
    ]
    n = commits["per_round"] * commits["rounds"]
    lines += [
        f"### Single-key commits (one client, {n:,} commits of each kind in {commits['rounds']} rounds; "
        f"`async`: returns once published in shared memory, WAL fsynced in the background; "
        f"`sync`: returns after the WAL fsync)",
        "",
        "| commit | commits/s (median of rounds) | round trip median | p99 | max |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = {"score": '`tx.root["users"][key]["score"] = v`', "counter": '`tx.root["counter"] = i`'}
    for name in commits["latencies"]:
        kind, durability = name.split()
        label = f"{labels[kind]}, durability={durability}"
        lat = commits["latencies"][name]
        lines.append(
            f"| {label} | {median(commits['rates'][name]):,.0f} | {median(lat) * 1e6:,.0f} µs | "
            f"{percentile(lat, 0.99) * 1e6:,.0f} µs | {max(lat) * 1e3:,.1f} ms |"
        )
    lines += [
        "",
        f"Automatic compactions during the timed commits: {commits['compactions']}.",
        "",
    ]
    shared, live, packed = memory["shared_bytes"], memory["live_bytes"], memory["msgpack_bytes"]
    shared_ratio = shared / packed
    if shared_ratio > MEMORY_TARGET:
        missed.append(f"memory: shared bytes = {shared_ratio:.2f}x the msgpack size, target <= {MEMORY_TARGET:g}x")
    lines += [
        f"### Memory ({memory['records']:,} records loaded in transactions of {BATCH:,}, then `db.compact()`)",
        "",
        "| quantity | bytes | / msgpack size | target |",
        "|---|---:|---:|---|",
        f"| msgpack size, sum of `len(msgpack.packb([key, record]))` | {_mib(packed)} | 1.00x | |",
        f"| `stats().shared_bytes` (all /dev/shm segments, {memory['segments']} data segments) | {_mib(shared)} | "
        f"**{shared_ratio:.2f}x** | <= {MEMORY_TARGET:g}x: {_verdict(shared_ratio <= MEMORY_TARGET)} |",
        f"| `stats().live_bytes` (reachable atoms) | {_mib(live)} | {live / packed:.2f}x | |",
        "",
        'Second reader process: takes a snapshot and reads `users[key]["score"]` of every record once; '
        "USS (`psutil memory_full_info().uss`) measured before the snapshot and after the reads.",
        "",
        "| reader | USS before | USS after | growth | growth / shared bytes | target < 5% | read time |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, reader in memory["readers"].items():
        growth = reader["uss_after"] - reader["uss_before"]
        fraction = growth / shared
        if fraction >= READER_TARGET:
            missed.append(f"second reader ({name}): USS grew by {fraction:.1%} of the shared bytes, target < 5%")
        lines.append(
            f"| {name} ({reader['cache_entries']:,} cached objects) | {_mib(reader['uss_before'])} | "
            f"{_mib(reader['uss_after'])} | {_mib(growth)} | **{fraction:.1%}** | "
            f"{_verdict(fraction < READER_TARGET)} | {reader['seconds']:.2f} s |"
        )
    lines += [
        "",
        "Loading times (not targets): "
        f"{reads['ops']:,} records {reads['load_seconds']:.1f} s (with compaction); "
        f"{memory['records']:,} records {memory['load_seconds']:.1f} s (without).",
        "",
    ]
    lines.append("Targets missed in this run: " + ("; ".join(missed) if missed else "none") + ".")
    return "\n".join(lines) + "\n", missed


def run(
    *,
    read_records: int,
    memory_records: int,
    repeats: int,
    commits: int,
    command: str,
    doc: str | None,
    show_profile: bool,
) -> int:
    """Run the three benchmarks, print the report, write it into `doc`; 0 on success."""
    info = machine()
    print(
        f"core benchmark: {read_records:,} records for reads and commits, {memory_records:,} for memory; "
        f"{info['nproc']} CPUs, load {info['load']}",
        flush=True,
    )
    with temporary_directory("protobase-bench-") as tmp:
        os.chmod(tmp, 0o700)
        print("reads ...", flush=True)
        reads, db = bench_reads(tmp, read_records, repeats)
        try:
            print("commits ...", flush=True)
            commit_results = bench_commits(db, read_records, commits, rounds=5)
        finally:
            close_and_wait(db)
        print("memory ...", flush=True)
        memory = bench_memory(tmp, memory_records)
    text, missed = report(command, info, reads, commit_results, memory)
    print()
    print(text)
    if missed or show_profile:
        print("cProfile of one warm ProtoBase read pass in the worker (sorted by own time):")
        print(reads["profile"])
    if doc:
        replace_section(doc, "core", text)
        print(f"written to {doc}")
    return 0
