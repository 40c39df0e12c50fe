"""What busy polling saves: `python -m benchmarks.busypoll [options]`.

Two measurements, each as a ratio in one run (protobase/wire/busypoll.py):

* the wake-up: a one-byte ping-pong over a Unix socketpair between two
  processes, each side sleeping on the socket, then each side busy polling
  first (the policy of `BusyPoll`), in microseconds per round trip; and the
  same ping-pong as a counter in shared memory that each side spins on (no
  system call at all): the floor of a commit channel in shared memory
  between two running processes;
* single-key commits from one client: two databases opened side by side,
  one with `busy_poll=0` (every message wakes its receiver) and one with the
  default, and batches of commits alternated between them, so that the
  machine's drift (it is shared and noisy) falls on both alike. The figure
  is the median of the per-pair ratios, with their quartiles.

Nothing is asserted; everything started is stopped.
"""

from __future__ import annotations

import argparse
import mmap
import os
import select
import shlex
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable

from .common import machine, temporary_directory

ROUND_TRIPS = 20_000
SPIN_TIMEOUT = 10.0  # seconds a shared-memory ping-pong waits for a side that stopped


def _round_trips(busy_poll: float) -> float:
    """Microseconds per ping-pong round trip between two processes, with this busy-poll limit."""
    from protobase.wire.busypoll import BusyPoll

    ours, theirs = socket.socketpair()

    def receiver(sock: socket.socket) -> Callable[[], bytes]:
        poll = BusyPoll(busy_poll)
        looks = select.poll()
        looks.register(sock, select.POLLIN)
        return lambda: poll.wait(lambda: looks.poll(0), lambda: looks.poll(None)) and sock.recv(64)

    child = os.fork()
    if child == 0:
        ours.close()
        receive = receiver(theirs)
        for _ in range(ROUND_TRIPS):
            receive()
            theirs.send(b"x")
        os._exit(0)
    theirs.close()
    receive = receiver(ours)
    started = time.perf_counter()
    for _ in range(ROUND_TRIPS):
        ours.send(b"x")
        receive()
    elapsed = time.perf_counter() - started
    os.waitpid(child, 0)
    ours.close()
    return 1e6 * elapsed / ROUND_TRIPS


def _shared_memory_round_trips() -> float:
    """Microseconds per ping-pong round trip through a shared counter that both processes spin on.

    Each side writes the round's number into its own cache line and spins
    until the other's holds it. A side whose peer died gives up after
    SPIN_TIMEOUT seconds with a TimeoutError, rather than spin for ever.
    """
    shared = mmap.mmap(-1, mmap.PAGESIZE)  # anonymous and MAP_SHARED: the forked child sees the same page
    ping, pong = 0, 64  # two cache lines, so that neither side's write invalidates what it spins on

    def spin_until(offset: int, value: int) -> None:
        deadline = time.monotonic() + SPIN_TIMEOUT
        while struct.unpack_from("Q", shared, offset)[0] != value:
            if time.monotonic() > deadline:
                raise TimeoutError("the other side of the shared-memory ping-pong stopped answering")

    child = os.fork()
    if child == 0:
        try:
            for i in range(1, ROUND_TRIPS + 1):
                spin_until(ping, i)
                struct.pack_into("Q", shared, pong, i)
        finally:
            os._exit(0)
    started = time.perf_counter()
    try:
        for i in range(1, ROUND_TRIPS + 1):
            struct.pack_into("Q", shared, ping, i)
            spin_until(pong, i)
    finally:
        elapsed = time.perf_counter() - started
        os.waitpid(child, 0)
        shared.close()
    return 1e6 * elapsed / ROUND_TRIPS


def _commits(durability: str, indexes: int, batches: int, tmp: str) -> dict[float, list[float]]:
    """Commits/s of each batch, by busy-poll limit, batches alternated between the two databases."""
    import protobase
    from protobase.settings import DEFAULTS

    databases = {}
    try:
        for busy_poll in (0.0, DEFAULTS.busy_poll):
            db = protobase.open(os.path.join(tmp, f"busy-poll-{busy_poll}"), durability=durability, busy_poll=busy_poll)
            databases[busy_poll] = db
            with db.transaction() as tx:
                tx.root["users"] = {f"u{i}": _record(i) for i in range(20_000)}
            with db.transaction() as tx:
                for fields in (("city",), ("score",), ("city", "score"))[:indexes]:
                    tx.root["users"].create_index(*fields)
        commits = 300 if durability == "async" else 100
        rates: dict[float, list[float]] = {busy_poll: [] for busy_poll in databases}
        for batch in range(batches):
            order = list(databases.items())
            for busy_poll, db in order if batch % 2 else order[::-1]:
                started = time.perf_counter()
                for i in range(commits):
                    with db.transaction() as tx:
                        tx.root["users"][f"w3-{i % 1000}"] = _record(batch * commits + i)
                rates[busy_poll].append(commits / (time.perf_counter() - started))
        return rates
    finally:
        for db in databases.values():
            db.close()


def _record(i: int) -> dict:
    return {"id": i, "name": "w3", "city": "w3", "score": i % 1000, "tags": []}


def run(durabilities: list[str], indexes: list[int], batches: int) -> int:
    from protobase.settings import DEFAULTS

    info = machine()
    print(f"{info['date']}; {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, load {info['load']}")
    asleep, polling = _round_trips(0.0), _round_trips(DEFAULTS.busy_poll)
    print(f"\nsocketpair round trip between two processes: {asleep:.1f} us sleeping, {polling:.1f} us busy polling")
    print(f"shared-memory counter round trip, both sides spinning: {_shared_memory_round_trips():.2f} us")
    print(f"\n| durability | indexes | busy_poll=0, commits/s | busy_poll={DEFAULTS.busy_poll:g} | ratio (quartiles) |")
    print("|---|---:|---:|---:|---|")
    with temporary_directory("pb-busypoll-") as tmp:
        for durability in durabilities:
            for count in indexes:
                rates = _commits(durability, count, batches, tmp)
                off, on = rates[0.0], rates[DEFAULTS.busy_poll]
                ratios = [a / b for a, b in zip(on, off)]
                low, _, high = statistics.quantiles(ratios, n=4)
                print(
                    f"| {durability} | {count} | {statistics.median(off):,.0f} | {statistics.median(on):,.0f} | "
                    f"{statistics.median(ratios):.2f}x ({low:.2f}-{high:.2f}) |",
                    flush=True,
                )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.busypoll", description=__doc__)
    parser.add_argument("--durability", nargs="+", choices=("async", "sync"), default=["async", "sync"])
    parser.add_argument("--indexes", type=int, nargs="+", choices=(0, 1, 2, 3), default=[0, 3])
    parser.add_argument("--batches", type=int, default=16, help="batches of commits per database")
    args = parser.parse_args(argv)
    print("$", shlex.join(["python", "-m", "benchmarks.busypoll", *(sys.argv[1:] if argv is None else argv)]))
    return run(args.durability, args.indexes, args.batches)


if __name__ == "__main__":
    sys.exit(main())
