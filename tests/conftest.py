"""Shared fixtures: every test leaves no process, no /dev/shm entry and no temporary directory.

All data directories live under one session directory. A directory of test
databases is removed through `remove_test_directory`: it waits until their
coordinators have exited (the flock on coordinator.lock is free), and fails
the test if a coordinator still serves it or if /dev/shm still holds segments
of an instance that one of its coordinators created (the `instance` file of a
data directory names it). Only those instances are judged: on a shared host,
other databases' segments, and other test sessions', are never counted as
ours, nor removed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import psutil
import pytest

from protobase.core.datadir import DataDir
from protobase.errors import ProtoBaseError
from protobase.shm import names
from protobase.shm.control import ControlBlock, process_is_alive

if TYPE_CHECKING:
    from protobase import Database

COORDINATOR_EXIT_TIMEOUT = 15.0
GRACE = 0.05  # seconds a test coordinator lingers after its last client
CHILD_JOIN_TIMEOUT = 60.0
SPAWN = multiprocessing.get_context("spawn")


def open_test_db(path: str | os.PathLike[str], **options: Any) -> Database:
    """`protobase.open(path, **options)` as every test opens a database: `shutdown_grace` defaults to GRACE.

    The one way tests open a database, in the test process and in the
    children it spawns alike (importable, unlike a fixture), so that each
    coordinator a test starts exits moments after its last client and the
    directory's teardown does not wait for it. Pass `shutdown_grace=` to
    keep a coordinator longer.
    """
    import protobase

    options.setdefault("shutdown_grace", GRACE)
    return protobase.open(path, **options)


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


def instances_under(root: str) -> set[str]:
    """Ids of the instances that coordinators created in the data directories under `root`.

    A coordinator writes its instance id into its directory's `instance` file
    when it starts and removes the file after a clean stop, once its segments
    are gone; a crashed one leaves it, naming the instance whose segments the
    next start would sweep.
    """
    found = set()
    for folder, _, files in os.walk(root):
        if "instance" in files:
            instance = DataDir(folder).read_instance()
            if names.is_instance_id(instance):
                found.add(instance)
    return found


def orphaned_entries(instances: set[str], settle: float = 2.0) -> set[str]:
    """/dev/shm entries of `instances` whose coordinator is not alive.

    An entry must stay orphaned for `settle` seconds to count: a coordinator
    that is stopping removes its segments just before it exits.
    """
    deadline = time.monotonic() + settle
    while True:
        orphans = {
            entry
            for instance in instances
            if not instance_is_served(instance)
            for entry in names.instance_entries(instance)
        }
        if not orphans or time.monotonic() > deadline:
            return orphans
        time.sleep(0.1)


def remove_test_directory(root: str, timeout: float = COORDINATOR_EXIT_TIMEOUT) -> list[str]:
    """Remove `root` once its coordinators have exited; return what they left behind, cleaned up.

    Problems are a coordinator still serving a directory under `root` after
    `timeout` (it is killed), and /dev/shm entries of the instances created
    under `root` (they are swept).
    """
    problems = []
    for folder in data_directories(root):
        if not wait_for_coordinator_exit(folder, timeout):
            problems.append(f"the coordinator of {folder} did not exit")
    # A coordinator that let go of its lock may still be exiting (finalising its
    # interpreter, on a loaded machine): only one that outlives the timeout is a problem.
    _, lingering = psutil.wait_procs(processes_serving(root), timeout=timeout)
    for process in lingering:
        try:
            problems.append(f"process {process.pid} still serves a test directory: {process.cmdline()}")
            process.send_signal(signal.SIGKILL)
            process.wait(COORDINATOR_EXIT_TIMEOUT)
        except psutil.NoSuchProcess:
            pass
    instances = instances_under(root)
    leaked = orphaned_entries(instances)
    if leaked:
        problems.append(f"/dev/shm entries leaked: {sorted(leaked)}")
        for instance in instances:
            names.sweep(instance)
    shutil.rmtree(root, ignore_errors=True)
    return problems


def data_directories(root: str) -> list[str]:
    """Every directory under `root` that a coordinator served (it holds coordinator.lock)."""
    return [folder for folder, _, files in os.walk(root) if "coordinator.lock" in files]


def in_forked_child(body: Callable[[], bytes]) -> bytes:
    """Run `body()` in a forked child; what it returns (b"ok", or why not)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, body())
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 64)
    os.close(read)
    os.waitpid(pid, 0)
    return answer


@pytest.fixture(scope="session")
def session_dir():
    base = tempfile.mkdtemp(prefix="protobase-test-")
    yield base
    problems = remove_test_directory(base)
    assert not problems, "; ".join(problems)


@pytest.fixture
def datadir(session_dir, request):
    """A fresh data directory path (not yet created), removed after the test once its coordinator exited."""
    parent = tempfile.mkdtemp(prefix="t", dir=session_dir)
    path = os.path.join(parent, "db")
    yield path
    problems = remove_test_directory(parent)
    assert not problems, "; ".join(problems)


@contextlib.contextmanager
def served(path: str, *options: str, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """`protobase serve path *options` in its own session, once it serves; ended and its directory unserved after.

    The body may stop it (SIGTERM) and check its exit status; a server still
    running at the end is killed.
    """
    server = subprocess.Popen(
        [sys.executable, "-m", "protobase", "serve", path, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=None if env is None else dict(os.environ, **env),
    )
    try:
        assert "serving" in server.stdout.readline()
        yield server
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdout.close()
        server.stderr.close()
    assert wait_for_coordinator_exit(path)


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
    database = open_test_db(datadir)
    yield database
    database.close()
