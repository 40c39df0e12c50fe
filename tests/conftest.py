"""Shared fixtures: every test leaves no process, no /dev/shm entry and no temporary directory.

All data directories live under one session directory. At the end of each
test using `datadir`, we wait until its coordinator has exited (its flock on
coordinator.lock is free) and remove the directory. At session end we check
that no coordinator serving a directory of ours is alive and that /dev/shm
holds nothing of ours; leftovers fail the session (and are cleaned, by pid and
by instance).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import tempfile
import time

import psutil
import pytest

from protobase.datadir import DataDir
from protobase.errors import ProtoBaseError
from protobase.shm import names
from protobase.shm.control import ControlBlock, process_is_alive

COORDINATOR_EXIT_TIMEOUT = 15.0
GRACE = 0.05  # seconds a test coordinator lingers after its last client
CHILD_JOIN_TIMEOUT = 60.0
SPAWN = multiprocessing.get_context("spawn")


def wait_for_coordinator_exit(path: str, timeout: float = COORDINATOR_EXIT_TIMEOUT) -> bool:
    """Wait until no coordinator serves `path`; True if none does."""
    if not os.path.exists(os.path.join(path, "coordinator.lock")):
        return True
    return DataDir(path).wait_until_unserved(timeout)


def wait_until(condition, what: str, timeout: float = 60.0):
    """The first truthy value of `condition()`, polled until `timeout`; AssertionError naming `what` after it."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def processes_serving(prefix: str) -> list[psutil.Process]:
    """Live processes whose command line names a path under `prefix`."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info["cmdline"] or []
        if process.pid != os.getpid() and any(prefix in part for part in cmdline):
            found.append(process)
    return found


def instance_is_served(instance: str) -> bool:
    """True while the coordinator that created `instance` is alive."""
    try:
        control = ControlBlock.attach(names.control_name(instance))
    except ProtoBaseError:
        return False
    try:
        return process_is_alive(control.coordinator_pid, control.coordinator_start)
    finally:
        control.close()


def orphaned_entries(before: set[str], settle: float = 2.0) -> set[str]:
    """/dev/shm entries new since `before` whose instance has no live coordinator.

    Other test sessions may run beside this one; their live instances are not
    ours to judge, and a crash test's orphans are swept by its next start, so
    an entry must stay orphaned for `settle` seconds to count.
    """
    deadline = time.monotonic() + settle
    while True:
        new = set(names.instance_entries()) - before
        orphans = {entry for entry in new if not instance_is_served(entry.split(".")[1])}
        if not orphans or time.monotonic() > deadline:
            return orphans
        time.sleep(0.1)


@pytest.fixture(scope="session")
def session_dir():
    base = tempfile.mkdtemp(prefix="protobase-test-")
    shm_before = set(names.instance_entries())
    yield base
    problems = []
    for process in processes_serving(base):
        problems.append(f"process {process.pid} still serves a test directory: {process.cmdline()}")
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    leaked = orphaned_entries(shm_before)
    if leaked:
        problems.append(f"/dev/shm entries leaked: {sorted(leaked)}")
        for instance in {entry.split(".")[1] for entry in leaked}:
            names.sweep(instance)
    shutil.rmtree(base, ignore_errors=True)
    assert not problems, "; ".join(problems)


@pytest.fixture
def datadir(session_dir, request):
    """A fresh data directory path (not yet created), removed after the test once its coordinator exited."""
    parent = tempfile.mkdtemp(prefix="t", dir=session_dir)
    path = os.path.join(parent, "db")
    yield path
    exited = wait_for_coordinator_exit(path)
    for process in processes_serving(path):
        process.send_signal(signal.SIGKILL)
    shutil.rmtree(parent, ignore_errors=True)
    assert exited, f"the coordinator of {path} did not exit after the test"


@pytest.fixture
def spawn_process():
    """start(target, *args, context=SPAWN): a child process, killed if still alive and joined after the test."""
    started = []

    def start(target, *args, context=SPAWN):
        process = context.Process(target=target, args=args, daemon=True)
        process.start()
        started.append(process)
        return process

    try:
        yield start
    finally:
        for process in started:
            if process.is_alive():
                process.kill()
            process.join(CHILD_JOIN_TIMEOUT)
            assert not process.is_alive(), f"child process {process.pid} could not be joined"


@pytest.fixture
def db(datadir):
    """An open database on a fresh directory, closed after the test."""
    import protobase

    database = protobase.open(datadir, shutdown_grace=GRACE)
    yield database
    database.close()
