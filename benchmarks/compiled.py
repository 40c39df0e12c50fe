"""The compiled core against the pure-Python modules: `python -m benchmarks.compiled`.

Two parts, each a ratio of the two implementations measured in the same run:

1. the functions the compiled core mirrors (codec.pack/unpack, frozen.freeze,
   a client's value checks and arena.write_atoms) on the shapes the engine
   handles: a dict leaf of 64 Refs, an index leaf of 64 composite entries, 64
   small records (a commit's, kept as their bytes, and their atoms framed
   into a segment's buffer);
2. end to end, in child processes started with and without
   PROTOBASE_PURE_PYTHON=1, interleaved: single-key commits from one client
   into a 100,000-key dict (`async` and `sync`), with the coordinator's and
   the client's CPU time per commit; a load of 100,000 records in
   transactions of 10,000; then point reads of 2,000 of them in a fresh
   reader process, cold (each decodes the nodes it walks) and warm, with the
   reader's private memory (USS) afterwards.

It prints; nothing is asserted (tests/test_ccodec.py checks that both write
the same bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

import psutil

from .common import median, temporary_directory

LEAF = 64
LOAD_RECORDS = 100_000
GRACE = 0.05  # the coordinator stops soon after the benchmark's handle closes


def micro() -> None:
    from protobase.client.writeset import check_keys, validate
    from protobase.core import codec, frozen

    if not codec.COMPILED:
        print("the compiled core is not built: nothing to compare")
        return
    refs = [[f"user{i:05d}" for i in range(LEAF)], [codec.Ref(i * 64, 2) for i in range(LEAF)]]
    index = [[(0, (f"city{i % 20:02d}", i), f"user{i}") for i in range(LEAF)], [None] * LEAF]
    records = {
        f"user{i}": {"id": i, "name": f"n{i}", "city": "Paris", "score": i, "tags": ["a", "b"]} for i in range(LEAF)
    }
    print(f"{'operation':44s} {'pure us':>9s} {'compiled us':>12s} {'speed-up':>9s}")
    for name, value in (("dict leaf of 64 Refs", refs), ("index leaf of 64 entries", index), ("64 records", records)):
        data = codec.pack(value)
        compare(f"encode {name}", lambda v=value: codec.pack_python(v), lambda v=value: codec.pack(v))
        compare(
            f"decode {name}",
            lambda d=data: codec.unpack_python(d, False, None, False),
            lambda d=data: codec.unpack(d, False, None, False),
        )
    keep_records(records)
    frame_records(records)
    record = records["user1"]
    compare("freeze one record (write-through)", lambda: frozen.freeze_python(record), lambda: frozen.freeze(record))
    compare(
        "check one record (a client's assignment)",
        lambda: (codec.validate(record, ("users", "k")), check_keys(record, ("users", "k"))),  # the pure walks
        lambda: validate(record, ("users", "k")),
    )


def keep_records(records: dict[str, Any]) -> None:
    """decode_ops's records kept as their bytes (codec.Packed) against decoded: a SET of 64 plain records."""
    from protobase.core import codec

    plain = {key: {field: item for field, item in record.items() if field != "tags"} for key, record in records.items()}
    data = codec.pack([[1, ["users"], plain]])
    kept = codec.PlainRecords(64, 32, 16 << 10)  # the writer's, with the default Settings
    compare(
        "decode a SET of 64 records, kept as bytes",
        lambda: codec.unpack_python(data, False, None, False, kept),
        lambda: codec.unpack(data, False, None, False, kept),
    )
    decoded, as_bytes = (per_call(lambda r=r: codec.unpack(data, False, None, False, r)) for r in (None, kept))
    print(f"{'  compiled: decoded / kept as bytes':44s} {decoded:9.2f} {as_bytes:12.2f} {decoded / as_bytes:8.1f}x")


def frame_records(records: dict[str, Any]) -> None:
    """arena.write_atoms against carena.c: a leaf's 64 record atoms framed into a buffer."""
    from protobase import native
    from protobase.core import arena, codec

    carena = native.load("protobase.core.carena")
    if carena is None:
        return
    payloads = [codec.pack(record) for record in records.values()]
    buf = memoryview(bytearray(64 << 10))
    compare(
        "frame 64 record atoms (append_many)",
        lambda: arena.write_atoms(buf, 0, arena.VALUE, payloads, 1 << 40),
        lambda: carena.write_atoms(buf, 0, arena.VALUE, payloads, 1 << 40),
    )


def compare(name: str, pure: Callable[[], Any], compiled: Callable[[], Any]) -> None:
    times = [per_call(pure), per_call(compiled)]
    print(f"{name:44s} {times[0]:9.2f} {times[1]:12.2f} {times[0] / times[1]:8.1f}x")


def per_call(call: Callable[[], Any], number: int = 2000) -> float:
    return min(timeit.repeat(call, number=number, repeat=5)) / number * 1e6


def child(seconds: float) -> dict[str, float]:
    """One process's end-to-end figures (run with or without PROTOBASE_PURE_PYTHON)."""
    import protobase

    results: dict[str, float] = {}
    for durability in ("async", "sync"):
        with (
            temporary_directory("protobase-bench-") as path,
            protobase.open(path, durability=durability, shutdown_grace=0.05) as db,
        ):
            with db.transaction() as tx:
                tx.root["users"] = {f"u{i}": {"n": i, "name": "x" * 10} for i in range(100_000)}
            coordinator = psutil.Process(db.coordinator_pid)
            for i in range(300):  # warm the caches of both processes
                with db.transaction() as tx:
                    tx.root["users"][f"u{i}"] = {"n": -i}
            before, mine, commits = coordinator.cpu_times(), time.process_time(), 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                with db.transaction() as tx:
                    tx.root["users"][f"u{commits % 100_000}"] = {"n": commits, "name": "y" * 10}
                commits += 1
            elapsed = time.perf_counter() - start
            after = coordinator.cpu_times()
            results[f"{durability} commits/s"] = commits / elapsed
            results[f"{durability} coordinator us/commit"] = (sum(after[:2]) - sum(before[:2])) / commits * 1e6
            results[f"{durability} client us/commit"] = (time.process_time() - mine) / commits * 1e6
    results.update(load(LOAD_RECORDS, 10_000))
    return results


def load(count: int, batch: int) -> dict[str, float]:
    import protobase

    records = {f"user{i:07d}": {"id": i, "name": f"n{i}", "city": f"c{i % 50}", "score": i % 100} for i in range(count)}
    keys = list(records)
    with (
        temporary_directory("protobase-bench-") as path,
        protobase.open(path, durability="async", shutdown_grace=0.05) as db,
    ):
        start = time.perf_counter()
        with db.transaction() as tx:
            tx.root["users"] = {}
        for first in range(0, count, batch):
            with db.transaction() as tx:
                users = tx.root["users"]
                for key in keys[first : first + batch]:
                    users[key] = records[key]
        per_record = (time.perf_counter() - start) / count * 1e6
        command = [sys.executable, "-m", "benchmarks.compiled", "--cold-reader", path]
        cold = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    return {"load us/record": per_record, **cold}


def cold_reader(path: str, reads: int = 2000) -> dict[str, float]:
    """Point reads of distinct random keys in a fresh process: every one decodes what it walks through."""
    import random

    import protobase

    keys = [f"user{i:07d}" for i in random.Random(7).sample(range(LOAD_RECORDS), reads)]
    with protobase.open(path, start_coordinator=False) as db, db.snapshot() as snapshot:
        users = snapshot.root["users"]
        start = time.perf_counter()
        for key in keys:
            users[key]["score"]
        cold = (time.perf_counter() - start) / reads * 1e6
        warm = min(timeit.repeat(lambda: [users[key]["score"] for key in keys], number=1, repeat=50)) / reads * 1e6
        heap = psutil.Process().memory_full_info().uss / 2**20
    return {"cold read us/get": cold, "warm read us/get": warm, "reader USS MiB": heap}


def end_to_end(rounds: int, seconds: float) -> None:
    samples: dict[str, dict[str, list[float]]] = {"pure": {}, "compiled": {}}
    for _ in range(rounds):
        for mode in ("pure", "compiled"):
            environment = dict(os.environ)
            environment.pop("PROTOBASE_PURE_PYTHON", None)
            if mode == "pure":
                environment["PROTOBASE_PURE_PYTHON"] = "1"
            command = [sys.executable, "-m", "benchmarks.compiled", "--child", "--seconds", str(seconds)]
            output = subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stdout
            for name, value in json.loads(output.splitlines()[-1]).items():
                samples[mode].setdefault(name, []).append(value)
    print(f"\n{'end to end (median of ' + str(rounds) + ' interleaved rounds)':44s} {'pure':>9s} {'compiled':>12s}")
    for name in samples["pure"]:
        pure, compiled = median(samples["pure"][name]), median(samples["compiled"][name])
        print(f"{name:44s} {pure:9.2f} {compiled:12.2f} {compiled / pure:8.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compiled", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the end-to-end part")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of commits of each kind per round")
    parser.add_argument("--micro-only", action="store_true", help="skip the end-to-end part")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cold-reader", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cold_reader:
        print(json.dumps(cold_reader(args.cold_reader)))
        return 0
    if args.child:
        print(json.dumps(child(args.seconds)))
        return 0
    micro()
    if not args.micro_only:
        end_to_end(args.rounds, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
