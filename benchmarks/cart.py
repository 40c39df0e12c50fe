"""`python -m benchmarks.cart`: a cart web app under gunicorn on ProtoBase, SQLite WAL and Redis.

The end-to-end target of issue 12 (lever 9): the same WSGI app
(benchmarks/cartapp/) served by gunicorn with 4 sync workers, loaded by `wrk`
over loopback with two mixes: read-heavy (90% view a cart, 10% add to it) and
write-heavy (90% add). An add reads the user's cart, adds an item and counts
the add in one shared counter, atomically; cartapp/stores.py says how on each
store. Every store is measured twice: durable (ProtoBase "sync", SQLite
synchronous=FULL, Redis appendfsync always) and relaxed ("async", NORMAL,
everysec).

Per mix and store: requests/s, p50 and p99 latency (wrk's, over every request
of the mix), failed requests, and the ratios against SQLite and Redis measured
in the same round; the table shows the median of `--rounds` rounds (the stores
in a rotating order per round). For ProtoBase also the attempts per add and the
longest run of conflicts one add lost before it committed. After each store's
run the benchmark checks the counter against the adds the workers served (a lost
update would show). `--stores protobase rmw` adds ProtoBase with the counter read and
written in every add (`stats["adds"] += 1`, every add conflicting on it) instead
of `stats.incr("adds")`.

Everything it starts (gunicorn, redis-server; ProtoBase's coordinator stops on
its own once the workers have gone, and is waited for) is stopped by its pid,
and the temporary directory is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .adapters.redis_store import Redis
from .cartapp import stores
from .common import machine, median, temporary_directory, wait_for_coordinator_exit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LUA = os.path.join(ROOT, "benchmarks", "cartapp", "cart.lua")
MIXES = {"read-heavy": 10, "write-heavy": 90}  # {mix -> percent of requests that add}
WORKERS = 4
START_TIMEOUT = 60.0
_RESULT = re.compile(r"CART_RESULT (.*)")


@dataclass(frozen=True)
class Variant:
    """A store as the benchmark runs it: the backend and, for ProtoBase, how the counter is written."""

    label: str
    backend: str  # protobase, sqlite, redis
    counter: str = "incr"


VARIANTS = {
    "protobase": Variant("ProtoBase", "protobase"),
    "rmw": Variant("ProtoBase (counter read-modify-write)", "protobase", "rmw"),
    "sqlite": Variant("SQLite WAL", "sqlite"),
    "redis": Variant("Redis", "redis"),
}


@dataclass
class Result:
    """One mix on one store in one round."""

    requests_per_s: float
    p50_ms: float
    p99_ms: float
    failed: int  # non-200 answers and socket errors
    attempts_per_add: float = 1.0
    longest_losing_run: int = 0
    lost_updates: int = 0  # adds served minus the counter's growth (0 unless an update was lost)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def redis_server(tmp: str, durable: bool) -> Iterator[int]:
    """A private redis-server on a free loopback port in `tmp`, stopped by pid on exit."""
    server = Redis()
    server.tmp = tmp
    try:
        server.start(tmp)
        server.set_mode("durable" if durable else "relaxed")
        yield server.port
    finally:
        server.stop()


@contextmanager
def gunicorn(environ: dict[str, str], port: int, log_path: str) -> Iterator[subprocess.Popen[bytes]]:
    """gunicorn serving the cart app with WORKERS sync workers; stopped by its pid (SIGTERM) on exit."""
    command = [
        sys.executable,
        "-m",
        "gunicorn",
        "--workers",
        str(WORKERS),
        "--worker-class",
        "sync",
        "--bind",
        f"127.0.0.1:{port}",
        "--backlog",
        "2048",
        "--graceful-timeout",
        "20",
        "--log-level",
        "warning",
        "benchmarks.cartapp.app:app",
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_healthy(port, process)
        yield process
    finally:
        stop(process)


def wait_healthy(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"gunicorn did not start (exit code {process.poll()}); see its log")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process we started, by its pid; its process group only if it does not stop in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: only what it started
            process.wait()


def wrk(port: int, add_percent: int, duration: float, threads: int, connections: int) -> dict[str, int]:
    """Run wrk with the cart mix; its CART_RESULT line as numbers."""
    environ = dict(os.environ, CART_ADD_PERCENT=str(add_percent), CART_USERS=str(stores.USERS))
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "30s",
        "-s",
        LUA,
        f"http://127.0.0.1:{port}",
    ]
    output = subprocess.run(command, env=environ, capture_output=True, text=True, timeout=duration + 120, check=True)
    found = _RESULT.search(output.stdout)
    if found is None:
        raise RuntimeError(f"wrk printed no result:\n{output.stdout}\n{output.stderr}")
    return {key: int(value) for key, value in (field.split("=") for field in found.group(1).split())}


def counter_value(variant: Variant, path: str, redis_port: int | None) -> int:
    if variant.backend == "protobase":
        import protobase

        with protobase.open(path, durability="async", shutdown_grace=0.2) as db, db.snapshot() as snapshot:
            adds: int = snapshot.root["stats"]["adds"]
        wait_for_coordinator_exit(path)
        return adds
    if variant.backend == "sqlite":
        import sqlite3

        con = sqlite3.connect(path)
        try:
            value: int = con.execute("SELECT value FROM counters WHERE name = 'adds'").fetchone()[0]
            return value
        finally:
            con.close()
    import redis

    assert redis_port is not None, "Redis runs on a port"
    r = redis.Redis(host="127.0.0.1", port=redis_port)
    try:
        return int(r.get("adds") or 0)
    finally:
        r.close()


def worker_stats(directory: str) -> dict[str, int]:
    total = {"adds": 0, "attempts": 0, "longest_losing_run": 0}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name)) as file:
            stats = json.load(file)
        os.unlink(os.path.join(directory, name))
        total["adds"] += stats["adds"]
        total["attempts"] += stats["attempts"]
        total["longest_losing_run"] = max(total["longest_losing_run"], stats["longest_losing_run"])
    return total


def run_store(variant: Variant, durable: bool, tmp: str, args: argparse.Namespace) -> dict[str, Result]:
    """Both mixes on one store: prepare it, serve it with gunicorn, load it with wrk, check the counter."""
    work = tempfile.mkdtemp(prefix=f"{variant.backend}-", dir=tmp)
    stats_dir = os.path.join(work, "stats")
    os.mkdir(stats_dir)
    path = os.path.join(work, "data" if variant.backend == "protobase" else "cart.sqlite")
    environ = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]),
        CART_BACKEND=variant.backend,
        CART_DURABILITY="durable" if durable else "relaxed",
        CART_PATH=path,
        CART_COUNTER=variant.counter,
        CART_STATS_DIR=stats_dir,
    )
    with redis_server(work, durable) if variant.backend == "redis" else _no_server() as redis_port:
        if redis_port is not None:
            environ["CART_REDIS_PORT"] = str(redis_port)
        stores.prepare(variant.backend, path, redis_port)
        if variant.backend == "protobase":
            wait_for_coordinator_exit(path)  # the workers start their own
        results: dict[str, Result] = {}
        counted_before = 0
        for mix, add_percent in MIXES.items():
            port = free_port()
            with gunicorn(environ, port, os.path.join(work, "gunicorn.log")):
                wrk(port, add_percent, args.warmup, args.threads, args.connections)  # every worker connected
                measured = wrk(port, add_percent, args.duration, args.threads, args.connections)
            if variant.backend == "protobase":
                wait_for_coordinator_exit(path)
            stats = worker_stats(stats_dir)
            counted = counter_value(variant, path, redis_port)
            results[mix] = Result(
                requests_per_s=measured["requests"] / (measured["duration_us"] / 1e6),
                p50_ms=measured["p50_us"] / 1000,
                p99_ms=measured["p99_us"] / 1000,
                failed=measured["failed"] + measured["errors"],
                attempts_per_add=stats["attempts"] / max(1, stats["adds"]),
                longest_losing_run=stats["longest_losing_run"],
                lost_updates=stats["adds"] - (counted - counted_before),
            )
            counted_before = counted
    return results


@contextmanager
def _no_server() -> Iterator[None]:
    yield None


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers: what was started is stopped


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    variants = [VARIANTS[name] for name in dict.fromkeys([*args.stores, "sqlite", "redis"])]  # the peers always
    info = machine()
    print(f"# cart web app under gunicorn ({WORKERS} sync workers), wrk -t{args.threads} -c{args.connections}")
    print(f"# {info['cpu']}, Python {info['python']}, load {info['load']}; {args.rounds} rounds of {args.duration}s")
    print(f"# command: {shlex.join(['python', '-m', 'benchmarks.cart', *sys.argv[1:]])}")
    # {(durability, mix, label) -> [Result per round]}
    measured: dict[tuple[str, str, str], list[Result]] = {}
    with temporary_directory("protobase-cart-") as tmp:
        for durability in args.durability:
            for round_number in range(args.rounds):
                shift = round_number % len(variants)
                for variant in variants[shift:] + variants[:shift]:
                    results = run_store(variant, durability == "durable", tmp, args)
                    for mix, result in results.items():
                        measured.setdefault((durability, mix, variant.label), []).append(result)
                        print(f"  {durability} {mix:11} round {round_number + 1} {variant.label:38} {_row(result)}")
                        sys.stdout.flush()
    print()
    print(report(measured, variants, args))
    return 0


def _row(result: Result) -> str:
    return (
        f"{result.requests_per_s:8.0f} req/s  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:8.2f} ms  "
        f"failed {result.failed}  attempts/add {result.attempts_per_add:.2f}  "
        f"longest losing run {result.longest_losing_run}  lost updates {result.lost_updates}"
    )


def report(
    measured: dict[tuple[str, str, str], list[Result]], variants: list[Variant], args: argparse.Namespace
) -> str:
    """A markdown table per durability: medians over the rounds, ratios of the medians of per-round ratios."""
    lines = []
    for durability in args.durability:
        modes = "sync / FULL / always" if durability == "durable" else "async / NORMAL / everysec"
        lines.append(f"### {durability} ({modes})")
        lines.append("")
        lines.append(
            "| mix | store | req/s | p50 ms | p99 ms | failed | req/s vs SQLite | req/s vs Redis | p99 vs SQLite "
            "| attempts/add | longest losing run | lost updates |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for mix in MIXES:
            sqlite_runs = measured[(durability, mix, VARIANTS["sqlite"].label)]
            redis_runs = measured[(durability, mix, VARIANTS["redis"].label)]
            for variant in variants:
                runs = measured[(durability, mix, variant.label)]
                vs_sqlite = median([r.requests_per_s / s.requests_per_s for r, s in zip(runs, sqlite_runs)])
                vs_redis = median([r.requests_per_s / s.requests_per_s for r, s in zip(runs, redis_runs)])
                p99_vs_sqlite = median([r.p99_ms / s.p99_ms for r, s in zip(runs, sqlite_runs)])
                lines.append(
                    f"| {mix} | {variant.label} | {median([r.requests_per_s for r in runs]):,.0f} "
                    f"| {median([r.p50_ms for r in runs]):.2f} | {median([r.p99_ms for r in runs]):.1f} "
                    f"| {sum(r.failed for r in runs)} | {vs_sqlite:.2f}x | {vs_redis:.2f}x | {p99_vs_sqlite:.2f}x "
                    f"| {median([r.attempts_per_add for r in runs]):.2f} | {max(r.longest_losing_run for r in runs)} "
                    f"| {sum(r.lost_updates for r in runs)} |"
                )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per durability (the table shows medians)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per mix and store")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measured run")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument(
        "--durability", nargs="+", choices=("durable", "relaxed"), default=["durable", "relaxed"], help="which to run"
    )
    parser.add_argument(
        "--stores",
        nargs="+",
        choices=tuple(VARIANTS),
        default=["protobase"],
        help="ProtoBase variants to run beside SQLite and Redis (rmw: the counter read and written)",
    )
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
