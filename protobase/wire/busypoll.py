"""Busy polling: look for a message for a short, learnt while before sleeping on it.

Owns the policy by which a process waits for its peer: the coordinator for
its clients' requests and the persistence process's reports, a client for
its replies, the persistence process for its doorbell. Runs in each of them,
one `BusyPoll` per waiting loop.

Why: a process that sleeps on a socket is woken by its peer through the
kernel, and on a virtual machine whose idle vCPUs halt (most clouds, and the
project's own machines: the guest does no halt polling) that wake-up costs
50-150 us, more than a whole commit. A waiter that is still running when the
message lands takes it with no wake-up at all. So a waiter first polls, for
up to its budget, yielding the CPU between looks (`os.sched_yield`), so that
polling only ever uses a CPU nobody else wants; then it sleeps as before. A
yield that let another process run ends the polling at once: on a contended
CPU a sleeper is served first when its message comes (the scheduler favours
a woken process over one that yielded), so there polling would only delay
the waiter (measured: 8 writers on 2 CPUs lost 12% to it).

The budget is learnt: twice the recent wait (a moving average of how long
waits took, each counted at most `4 * limit`, that starts at `limit / 2`),
and nothing when the recent wait is over `limit`, so a loop whose messages
come rarely (an idle coordinator, a client whose replies wait for others'
commits) stops polling by itself, and starts again once they come quickly.
A wait that timed out or found the CPU contended counts as `4 * limit`: two
in a row stop the polling, a rare one (a vCPU the host paused) does not.

Invariant: polling never takes anything off the socket: `ready` only looks,
so an exception during the poll (Ctrl-C) leaves the stream as it was.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["BusyPoll", "cpus_available"]

T = TypeVar("T")

WEIGHT = 1 / 8  # of the newest wait in the moving average
CLIP = 4  # a wait counts at most CLIP * limit, so a long idle gap is soon forgotten
CONTENDED = 0.0001  # seconds: a yield that took longer let another process run (alone: 1.3 us, p99.9 29 us)


CGROUP_QUOTAS = (  # (quota file, period file or None when the quota file holds both): cgroup v2, then v1
    ("/sys/fs/cgroup/cpu.max", None),
    ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
)


def cpus_available() -> int:
    """Whole CPUs this process may use (polling needs a second one, for the peer).

    The fewer of the CPUs it may run on and of its cgroup's CPU quota: in a
    container limited to one CPU, polling would only spend the quota.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return cpus if quota is None else max(1, min(cpus, int(quota)))


def _cgroup_quota() -> float | None:
    """The CPUs' worth of time this process's cgroup may use, if it has a quota."""
    for quota_file, period_file in CGROUP_QUOTAS:
        try:
            fields = _read(quota_file).split()
            quota, period = fields[0], fields[1] if period_file is None else _read(period_file)
            return None if quota in ("max", "-1") else int(quota) / int(period)
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return None


def _read(path: str) -> str:
    with open(path) as file:
        return file.read()


class BusyPoll:
    """Poll-then-sleep waits, with a polling budget learnt from the waits so far.

    `limit` is the longest a wait polls, in seconds; 0 (or a single CPU)
    never polls. `clock` is in seconds (a fake one in tests).
    """

    def __init__(self, limit: float, clock: Callable[[], float] = time.perf_counter) -> None:
        self.limit = limit if cpus_available() > 1 else 0.0
        self.clock = clock
        self.recent = self.limit / 2  # moving average of the waits, in seconds: short until shown otherwise
        self.polled = 0  # waits that polling ended (no sleep)
        self.slept = 0  # waits that slept

    @property
    def budget(self) -> float:
        """Seconds the next wait polls before it sleeps."""
        if self.recent > self.limit:
            return 0.0
        return min(self.limit, 2 * self.recent)

    def wait(self, ready: Callable[[], T], sleep: Callable[[], T], within: float | None = None) -> T:
        """`ready()` polled until it is true or the budget is spent, then `sleep()`; the first true result.

        `ready` must only look (e.g. poll with a zero timeout); `sleep` may
        block. Whatever `sleep` returns is returned, a timeout included.
        `within` (seconds) bounds the polling, for a wait with a timeout.
        """
        clock = self.clock
        started = clock()
        contended = False
        budget = self.budget if within is None else min(self.budget, within)
        if budget > 0.0:
            end = started + budget
            while True:
                found = ready()
                if found:
                    self.polled += 1
                    self._learn(clock() - started)
                    return found
                looked = clock()
                if looked >= end:
                    break
                os.sched_yield()
                # Another process ran meanwhile: the CPU is wanted. A sleeper is woken ahead of
                # the processes that ran (a poller that yielded is not), so sleep.
                contended = clock() - looked > CONTENDED
                if contended:
                    break
        found = sleep()
        self.slept += 1
        # A contended CPU, or a sleep that timed out (an idle peer), counts as a long wait.
        self._learn(CLIP * self.limit if contended or not found else clock() - started)
        return found

    def _learn(self, waited: float) -> None:
        self.recent += WEIGHT * (min(waited, CLIP * self.limit) - self.recent)
