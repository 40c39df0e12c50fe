"""How long a commit waits on a compaction: `python -m benchmarks.compaction [--records N] [--seconds S]`.

Issue 12's target: no commit waits more than 20 ms on a compaction, however
large the database. One run serves two databases of `--records` records
(`protobase serve`, `compact_min_bytes` 8 MiB so that compactions come
often), one compacting at once (`--compact-in-steps-above` larger than the
data: the behaviour before compactions were made in steps) and one in steps
(the default), and drives each with the same closed loop of single-key
`async` commits, each rewriting a 2 KB value, for `--seconds`: per-commit
latency (p50, p99, p99.9, longest), commits/s and the compactions it saw. The
at-once database is the reference measured in the same run. Nothing is
asserted; the servers are stopped and the directories removed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time

import protobase

from .common import machine, percentile, temporary_directory

COMPACT_MIN = 8 << 20
MODES = {"at once": str(1 << 40), "in steps": None}  # --compact-in-steps-above; None: the default


def _serve(path: str, in_steps_above: str | None) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "protobase", "serve", path, "--compact-min-bytes", str(COMPACT_MIN)]
    if in_steps_above is not None:
        command += ["--compact-in-steps-above", in_steps_above]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert server.stdout is not None and "serving" in server.stdout.readline()
    return server


def _load(db: protobase.Database, records: int) -> None:
    chunk = 50_000
    for start in range(0, records, chunk):
        with db.transaction() as tx:
            if start == 0:
                tx.root["users"] = {}
            users = tx.root["users"]
            for i in range(start, min(records, start + chunk)):
                users[f"user{i:07d}"] = {"id": i, "name": f"name{i}", "city": "Lyon", "score": i % 1000}


def _drive(db: protobase.Database, records: int, seconds: float) -> dict[str, float]:
    latencies = []
    before = db.stats()
    payload = "x" * 2000
    began = time.perf_counter()
    end = began + seconds
    i = 0
    now = began
    while now < end:
        started = time.perf_counter()
        with db.transaction(durability="async") as tx:
            tx.root["users"][f"user{(i * 7919) % records:07d}"] = {"id": i, "blob": payload}
        now = time.perf_counter()
        latencies.append(now - started)
        i += 1
    after = db.stats()
    return {
        "rate": i / (now - began),
        "p50": percentile(latencies, 0.5),
        "p99": percentile(latencies, 0.99),
        "p999": percentile(latencies, 0.999),
        "longest": max(latencies),
        "compactions": after.compactions - before.compactions,
    }


def run(records: int, seconds: float) -> int:
    info = machine()
    results = {}
    with temporary_directory("pb-compaction-") as tmp:
        for mode, above in MODES.items():
            path = os.path.join(tmp, mode.replace(" ", "-"))
            os.mkdir(path, 0o700)
            server = _serve(path, above)
            try:
                with protobase.open(path, durability="async") as db:
                    _load(db, records)
                    db.compact()
                    live = db.stats().live_bytes
                    results[mode] = dict(_drive(db, records, seconds), live=live)
                    print(f"  {mode}: {results[mode]}", flush=True)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=120)
    print(
        f"\n{info['date']}; {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, load average at start "
        f"{info['load']}; {records:,} records, {seconds:g} s of single-key async commits each"
    )
    print(
        "| compaction | live MiB | compactions | commits/s | p50 ms | p99 ms | p99.9 ms | longest ms "
        "| longest / at once |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    reference = results["at once"]["longest"]
    for mode, r in results.items():
        print(
            f"| {mode} | {r['live'] / 2**20:.1f} | {r['compactions']:.0f} | {r['rate']:,.0f} | {r['p50'] * 1e3:.2f} | "
            f"{r['p99'] * 1e3:.2f} | {r['p999'] * 1e3:.2f} | {r['longest'] * 1e3:.1f} | "
            f"{r['longest'] / reference:.2f}x |"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compaction", description=__doc__)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args(argv)
    print("$", shlex.join(["python", "-m", "benchmarks.compaction", *(sys.argv[1:] if argv is None else argv)]))
    return run(args.records, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
