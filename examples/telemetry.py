"""Telemetry ingestion: producer processes append events fast, a consumer aggregates them incrementally.

What it shows: high write throughput from several processes into one
database, and incremental processing from snapshots.

* Producers write batches of events `[device, metric, value, ts]`, one batch
  per transaction, with durability="async" (a commit returns once published in
  memory; the log is fsynced within milliseconds). Each producer owns its
  event log `root["events"][producer][batch number]`, so producers never write
  the same key path and never conflict. Batches hold more than 256 events on
  purpose: a list that long is stored as a tree of its own, so the log dict
  holds only pointers to batches. Smaller batches would sit inline in the log
  dict while it has 64 keys or fewer, and each commit would rewrite them all.
* The consumer wakes up every INTERVAL seconds, takes a snapshot, reads only
  the batches it has not seen (it keeps one cursor per producer), and folds them
  into per-device, per-metric aggregates (count, sum, mean, min, max). It
  commits the aggregates together with its cursors in one transaction, so
  a restarted consumer resumes exactly where the last commit left it.

At the end it checks that the consumer counted every event exactly once,
prints the achieved events/s and a few aggregates, and exits 1 if a check fails.

Run it (from the repository root):

    python -m examples.telemetry --producers 3 --seconds 5

Without --path it works in a temporary directory, removed at the end; every
process it starts is joined, and it waits for the coordinator to exit.
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

METRICS = ["temperature", "humidity", "load"]
INTERVAL = 0.25  # seconds between two consumer rounds
SHUTDOWN_GRACE = 0.2
START_TIMEOUT = 120.0


def producer_name(index: int) -> str:
    return f"p{index}"


# -- producers --------------------------------------------------------------------------------


def make_batch(rng: random.Random, devices: int, size: int) -> list[list]:
    now = time.time()
    return [
        [f"dev{rng.randrange(devices):03}", metric, round(rng.gauss(50, 15), 3), now]
        for metric in rng.choices(METRICS, k=size)
    ]


def producer_main(path: str, index: int, seconds: float, batch: int, devices: int, go: Any, results: Any) -> None:
    """Append batches to this producer's own log for `seconds`; report (events, start, end)."""
    rng = random.Random(index)
    name = producer_name(index)
    events = 0
    with protobase.open(path, durability="async") as db:
        go.wait()
        started = time.monotonic()  # system-wide clock: comparable across processes
        deadline = started + seconds
        number = 0
        while time.monotonic() < deadline:
            with db.transaction() as tx:
                tx.root["events"][name][number] = make_batch(rng, devices, batch)
            number += 1
            events += batch
        results.put((name, events, started, time.monotonic()))


# -- the consumer ---------------------------------------------------------------------------


def fold(aggregates: dict, events: list) -> None:
    """Add events to {device -> {metric -> {"count", "sum", "min", "max"}}} in place."""
    for device, metric, value, _ts in events:
        stats = aggregates.setdefault(device, {}).setdefault(metric, None)
        if stats is None:
            aggregates[device][metric] = {"count": 1, "sum": value, "min": value, "max": value}
        else:
            stats["count"] += 1
            stats["sum"] += value
            stats["min"] = min(stats["min"], value)
            stats["max"] = max(stats["max"], value)


def consume_round(db: protobase.Database, cursors: dict, aggregates: dict) -> int:
    """Fold the batches committed since the last round; commit aggregates and cursors; return events read."""
    read = 0
    with db.snapshot() as snapshot:
        logs = snapshot.root["events"]
        for name, log in logs.items():
            number = cursors.get(name, 0)
            while number in log:
                batch = log[number]
                fold(aggregates, batch)
                read += len(batch)
                number += 1
            cursors[name] = number
    if read:
        with db.transaction() as tx:  # only the consumer writes these: no conflict to retry
            tx.root["aggregates"] = {
                device: {metric: dict(stats, mean=stats["sum"] / stats["count"]) for metric, stats in metrics.items()}
                for device, metrics in aggregates.items()
            }
            tx.root["cursors"] = dict(cursors)
    return read


def consumer_main(path: str, stop: Any, results: Any) -> None:
    """Run rounds every INTERVAL until `stop`, then a last round; report (rounds, events read)."""
    with protobase.open(path, durability="async") as db:
        with db.snapshot() as snapshot:  # resume from the last committed round
            cursors = dict(snapshot.root.get("cursors", {}))
            aggregates = {
                device: {
                    metric: {key: stats[key] for key in ("count", "sum", "min", "max")}
                    for metric, stats in metrics.items()
                }
                for device, metrics in snapshot.root.get("aggregates", {}).items()
            }
        rounds = events = 0
        while True:
            stopping = stop.wait(INTERVAL)  # set only once every producer has committed its last batch
            events += consume_round(db, cursors, aggregates)
            rounds += 1
            if stopping:
                break
        results.put(("consumer", rounds, events))


# -- the pipeline -----------------------------------------------------------------------------


def run(path: str, producers: int, seconds: float, batch: int, devices: int) -> dict:
    """Start the consumer and the producers, let them run, stop and join them; return what was measured."""
    context = multiprocessing.get_context("spawn")
    go, stop, results = context.Event(), context.Event(), context.Queue()
    with protobase.open(path, durability="async", shutdown_grace=SHUTDOWN_GRACE) as db:
        with db.transaction() as tx:
            tx.root["events"] = {producer_name(index): {} for index in range(producers)}
        consumer = context.Process(target=consumer_main, args=(path, stop, results), name="telemetry-consumer")
        workers = [
            context.Process(
                target=producer_main,
                name=f"telemetry-{producer_name(index)}",
                args=(path, index, seconds, batch, devices, go, results),
            )
            for index in range(producers)
        ]
        processes = [consumer, *workers]
        for process in processes:
            process.start()
        try:
            go.set()
            produced = [results.get(timeout=seconds + START_TIMEOUT) for _ in workers]
            for worker in workers:
                worker.join()
            stop.set()
            _, rounds, consumed = results.get(timeout=START_TIMEOUT)
            consumer.join()
        finally:
            stop.set()
            go.set()
            for process in processes:
                process.join(timeout=START_TIMEOUT)
                if process.is_alive():  # something went wrong above: do not leave it behind
                    process.kill()
                    process.join()
        with db.snapshot() as snapshot:
            aggregates = {
                device: {metric: dict(stats) for metric, stats in metrics.items()}
                for device, metrics in snapshot.root.get("aggregates", {}).items()
            }
            stored = sum(len(batch) for log in snapshot.root["events"].values() for batch in log.values())
    events = sum(count for _, count, _, _ in produced)
    elapsed = max(end for *_, end in produced) - min(start for _, _, start, _ in produced)
    return {
        "events": events,
        "elapsed": elapsed,
        "stored": stored,
        "consumed": consumed,
        "rounds": rounds,
        "aggregated": sum(stats["count"] for metrics in aggregates.values() for stats in metrics.values()),
        "aggregates": aggregates,
        "per_producer": {name: count for name, count, _, _ in produced},
        "exit_codes": [process.exitcode for process in processes],
    }


def report(result: dict) -> bool:
    """Print the throughput, a few aggregates and the checks; True when every check passed."""
    print(
        f"{result['events']} events from {len(result['per_producer'])} producers in {result['elapsed']:.2f}s: "
        f"{result['events'] / result['elapsed']:,.0f} events/s ({result['per_producer']})"
    )
    print(f"consumer: {result['rounds']} rounds, {result['consumed']} events aggregated incrementally")
    aggregates = result["aggregates"]
    for device in sorted(aggregates)[:5]:
        cells = ", ".join(
            f"{metric} n={stats['count']} mean={stats['mean']:.2f}"
            for metric, stats in sorted(aggregates[device].items())
        )
        print(f"  {device}: {cells}")
    checks = {
        "every produced event is stored": result["stored"] == result["events"],
        "the consumer read every event exactly once": result["consumed"] == result["events"],
        "the stored aggregates count every event": result["aggregated"] == result["events"],
        "every process exited cleanly": all(code == 0 for code in result["exit_codes"]),
    }
    for name, passed in checks.items():
        print(f"{'ok  ' if passed else 'FAIL'} {name}")
    return all(checks.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--producers", type=int, default=3, help="producer processes")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long the producers run")
    parser.add_argument("--batch", type=int, default=500, help="events per transaction (keep it above 256)")
    parser.add_argument("--devices", type=int, default=50, help="distinct devices")
    parser.add_argument("--path", help="data directory (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    base = None if args.path else tempfile.mkdtemp(prefix="protobase-telemetry-")
    path = args.path or os.path.join(base, "db")
    try:
        ok = report(run(path, args.producers, args.seconds, args.batch, args.devices))
    finally:
        if os.path.isdir(path) and not DataDir(path).wait_until_unserved(timeout=30):
            print(f"warning: the coordinator of {path} is still running (another client attached?)")
        if base is not None:
            shutil.rmtree(base, ignore_errors=True)
            print(f"removed the temporary data directory {base}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
