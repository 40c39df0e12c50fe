"""Busy polling (protobase/wire/busypoll.py): it polls only while waits are short, and yields between looks.

The clock is a fake one that each look advances, so every budget is exact.
"""

from __future__ import annotations

import os

import pytest

from protobase.wire import busypoll
from protobase.wire.busypoll import BusyPoll

LIMIT = 0.001  # seconds


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def two_cpus(monkeypatch):
    monkeypatch.setattr(busypoll, "cpus_available", lambda: 2)


def poller(clock: Clock, limit: float = LIMIT) -> BusyPoll:
    return BusyPoll(limit, clock=clock)


def peer(clock: Clock, arrives_after: float, step: float = 0.00001):
    """`ready` and `sleep` for a message that arrives `arrives_after` seconds into the wait."""
    started = clock.now
    looks = []

    def ready():
        looks.append(clock.now)
        if clock.now - started >= arrives_after:
            return ["message"]
        clock.now += step
        return []

    def sleep():
        clock.now = max(clock.now, started + arrives_after)
        return ["message"]

    return ready, sleep, looks


def nothing(clock: Clock, step: float = 0.00001):
    """`ready` for a peer that sends nothing: each look finds nothing and takes `step`."""

    def ready():
        clock.now += step
        return []

    return ready


def wait(poll: BusyPoll, clock: Clock, arrives_after: float) -> int:
    """One wait for a message `arrives_after` seconds away; how many times it looked without sleeping."""
    ready, sleep, looks = peer(clock, arrives_after)
    assert poll.wait(ready, sleep) == ["message"]
    return len(looks)


def test_short_waits_are_taken_while_polling_and_learnt():
    clock = Clock()
    poll = poller(clock)
    assert poll.budget == LIMIT  # short until shown otherwise
    for _ in range(20):
        assert wait(poll, clock, 0.0002) > 0
    assert poll.polled == 20 and poll.slept == 0
    assert poll.recent == pytest.approx(0.0002, rel=0.2)
    assert poll.budget == pytest.approx(2 * poll.recent)


def test_a_wait_past_its_budget_sleeps():
    clock = Clock()
    poll = poller(clock)
    poll.recent = 0.0001
    ready, sleep, looks = peer(clock, arrives_after=0.0008)
    assert poll.wait(ready, sleep) == ["message"]
    assert poll.slept == 1 and poll.polled == 0
    assert len(looks) == pytest.approx(20, abs=1)  # it polled for its whole budget (2 * recent) first, a look a step


def test_waits_longer_than_the_limit_stop_the_polling():
    clock = Clock()
    poll = poller(clock)
    for _ in range(40):
        wait(poll, clock, 0.003)
    assert poll.recent > LIMIT and poll.budget == 0.0
    assert wait(poll, clock, 0.003) == 0  # no look at all: straight to sleep


def test_a_wait_that_times_out_counts_as_long():
    clock = Clock()
    poll = poller(clock)
    poll.recent = 0.0001
    for _ in range(2):
        assert poll.wait(nothing(clock), lambda: []) == []
    assert poll.recent > LIMIT and poll.budget == 0.0


def test_polling_resumes_once_waits_are_short_again():
    clock = Clock()
    poll = poller(clock)
    for _ in range(5):
        poll.wait(nothing(clock), lambda: [])  # an idle peer
    assert poll.budget == 0.0
    for _ in range(30):
        wait(poll, clock, 0.0001)
    assert poll.budget > 0.0 and wait(poll, clock, 0.0001) > 0


def test_it_yields_the_cpu_between_looks(monkeypatch):
    clock = Clock()
    poll = poller(clock)
    poll.recent = 0.0005
    yields = []
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(clock.now))
    assert wait(poll, clock, 0.0001) == len(yields) + 1


def test_no_limit_or_one_cpu_never_polls(monkeypatch):
    clock = Clock()
    assert poller(clock, limit=0.0).budget == 0.0
    monkeypatch.setattr(busypoll, "cpus_available", lambda: 1)
    poll = poller(clock)
    poll.recent = 0.0001
    assert poll.limit == 0.0 and poll.budget == 0.0 and wait(poll, clock, 0.0001) == 0


def test_an_exception_while_polling_leaves_the_sleep_undone():
    clock = Clock()
    poll = poller(clock)
    poll.recent = 0.0001
    slept = []

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        poll.wait(interrupted, lambda: slept.append(True))
    assert not slept


@pytest.mark.parametrize(
    ("files", "cpus"),
    [
        ({"cpu.max": "50000 100000\n"}, 1),  # cgroup v2, half a CPU
        ({"cpu.max": "300000 100000\n"}, 2),  # three CPUs' worth: the two we may run on
        ({"cpu.max": "max 100000\n"}, 2),  # no quota
        ({"cpu.cfs_quota_us": "100000\n", "cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1, one CPU
        ({"cpu.cfs_quota_us": "-1\n", "cpu.cfs_period_us": "100000\n"}, 2),
        ({}, 2),  # no cgroup files
        ({"cpu.max": "garbage"}, 2),
    ],
)
def test_a_cgroup_cpu_quota_caps_the_cpus_polling_counts_on(tmp_path, monkeypatch, files, cpus):
    monkeypatch.undo()  # the real cpus_available, not the fixture's
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(
        busypoll,
        "CGROUP_QUOTAS",
        ((str(tmp_path / "cpu.max"), None), (str(tmp_path / "cpu.cfs_quota_us"), str(tmp_path / "cpu.cfs_period_us"))),
    )
    assert busypoll.cpus_available() == cpus
    assert (BusyPoll(LIMIT).limit > 0) == (cpus > 1)


def test_a_yield_that_let_another_process_run_ends_the_polling(monkeypatch):
    clock = Clock()
    poll = poller(clock)
    poll.recent = 0.0002
    monkeypatch.setattr(os, "sched_yield", lambda: setattr(clock, "now", clock.now + 0.0002))  # someone ran
    ready, sleep, looks = peer(clock, arrives_after=0.0003)
    assert poll.wait(ready, sleep) == ["message"]
    assert len(looks) == 1 and poll.slept == 1  # one look, one yield that took 200 us, then a sleep
    assert poll.budget > 0.0  # one contended wait does not stop the polling (a host's hiccup)...
    wait(poll, clock, 0.0003)
    assert poll.budget == 0.0  # ...two in a row do
    monkeypatch.setattr(os, "sched_yield", lambda: None)  # the CPU is free again
    sleeps = 0
    while wait(poll, clock, 0.0001) == 0:
        sleeps += 1
    assert 1 <= sleeps <= 4  # then polling resumes


def test_a_wait_with_a_timeout_polls_no_longer_than_it():
    clock = Clock()
    poll = poller(clock)
    assert poll.budget == LIMIT
    looks = []

    def ready():
        looks.append(clock.now)
        clock.now += 0.00001
        return []

    assert poll.wait(ready, lambda: [], within=0.00005) == []
    assert len(looks) == pytest.approx(5, abs=1)  # 50 us of looks, 10 us each, not the budget's 1 ms
