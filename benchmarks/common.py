"""Helpers shared by benchmarks: the data set, timing, the machine, cleanup and the doc.

Nothing here times anything by itself; it keeps the benchmark modules about
what they measure.
"""

from __future__ import annotations

import datetime
import fcntl
import functools
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "record",
    "key_of",
    "median",
    "percentile",
    "machine",
    "wait_for_coordinator_exit",
    "temporary_directory",
    "replace_section",
    "released_worker",
    "run_released_together",
]

COORDINATOR_EXIT_TIMEOUT = 30.0


def key_of(i: int) -> str:
    """The key of record `i` in root['users']."""
    return f"user{i}"


def record(i: int) -> dict:
    """Record `i` of the benchmark data set."""
    return {"id": i, "name": f"user{i}", "score": i % 1000, "tags": ["a", "b"]}


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], fraction: float) -> float:
    """The `fraction` quantile (nearest rank) of `values`."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
    return ordered[index]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "load": " ".join(f"{load:.2f}" for load in os.getloadavg()),
    }


def wait_for_coordinator_exit(path: str, timeout: float = COORDINATOR_EXIT_TIMEOUT) -> bool:
    """Wait until no coordinator holds `path`/coordinator.lock; True once it is free."""
    lock_path = os.path.join(path, "coordinator.lock")
    if not os.path.exists(lock_path):
        return True
    deadline = time.monotonic() + timeout
    fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.01)
    finally:
        os.close(fd)


@contextmanager
def temporary_directory(prefix: str) -> Iterator[str]:
    """A private temporary directory, removed on exit."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def replace_section(path: str, name: str, body: str) -> None:
    """Put `body` between the `<!-- name:begin -->` and `<!-- name:end -->` markers of `path`.

    Appends the marked section when the file (or the markers) do not exist yet.
    """
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    section = f"{begin}\n{body.rstrip()}\n{end}"
    try:
        with open(path) as doc:
            text = doc.read()
    except FileNotFoundError:
        text = ""
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + ("\n\n" if text else "") + section + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as doc:
        doc.write(text)


def expect(conn: Any, process: Any, status: str, timeout: float) -> Any:
    """The payload of the next (status, payload) a worker sends; RuntimeError if it fails, dies or is silent."""
    try:
        if not conn.poll(timeout):
            raise RuntimeError(f"worker {process.name} sent nothing in {timeout:.0f}s")
        got, payload = conn.recv()
    except EOFError:
        raise RuntimeError(f"worker {process.name} died (exit code {process.exitcode})") from None
    if got != status:
        raise RuntimeError(f"worker {process.name} failed:\n{payload}")
    return payload


def released_worker(body: Callable[..., Any]) -> Callable[..., None]:
    """Make `body(conn, start, *args) -> result` a worker of `run_released_together`.

    The body sends ("ready", ...) itself once set up; this sends ("ok", its
    result), or ("error", traceback) for anything it raises, and closes the pipe.
    """

    @functools.wraps(body)
    def worker(conn: Any, start: Any, *args: Any) -> None:
        try:
            conn.send(("ok", body(conn, start, *args)))
        except BaseException:  # report anything to the parent, which raises it
            conn.send(("error", traceback.format_exc()))
        finally:
            conn.close()

    return worker


def run_released_together(
    target: Any,
    args_per_worker: list[tuple],
    names: list[str],
    ready_timeout: float,
    timeout: float,
    exit_timeout: float = 60.0,
) -> list:
    """Start one spawned worker per args tuple, release them at once, return their results; always joins them.

    Each worker runs `target(conn, start, *args)`: it sends ("ready", None) once
    set up, waits for `start`, then sends ("ok", result) or ("error", traceback)
    (`released_worker` does the latter).
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start = context.Event()
    workers = []
    try:
        for args, name in zip(args_per_worker, names):
            parent_end, child_end = context.Pipe(duplex=False)
            process = context.Process(target=target, name=name, args=(child_end, start, *args))
            process.start()
            child_end.close()
            workers.append((process, parent_end))
        for process, conn in workers:
            expect(conn, process, "ready", ready_timeout)
        start.set()
        return [expect(conn, process, "ok", timeout) for process, conn in workers]
    finally:
        start.set()  # never leave a worker waiting
        for process, conn in workers:
            conn.close()
            process.join(exit_timeout)
            if process.is_alive():
                process.terminate()
                process.join()
