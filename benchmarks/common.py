"""Helpers shared by benchmarks: the data set, timing, the machine, cleanup and the doc.

Nothing here times anything by itself; it keeps the benchmark modules about
what they measure.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = [
    "record", "key_of", "median", "percentile", "machine", "wait_for_coordinator_exit",
    "temporary_directory", "replace_section",
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
