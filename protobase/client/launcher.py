"""Start-or-attach: connect a client to its data directory's coordinator.

The first `protobase.open(dir)` finds no coordinator and starts one; any
number of processes may race to do so. The race is settled by `launch.lock`:
whoever holds it checks again for a live coordinator and only then spawns one,
so two openers never start two coordinators (and a second coordinator would
refuse anyway, on `coordinator.lock`).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time

from protobase import errors
from protobase.core.datadir import DataDir, FileLock
from protobase.errors import CoordinatorError

__all__ = ["connect", "try_connect"]

START_TIMEOUT = 600.0  # recovery of a large database happens before the coordinator listens


def try_connect(datadir: DataDir) -> socket.socket | None:
    """A connection to a live coordinator, or None when none listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with datadir.socket_address() as address:
            sock.connect(address)
    except OSError as error:
        sock.close()
        if error.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None
        raise CoordinatorError(f"cannot connect to {datadir.socket_path}: {error.strerror}") from None
    return sock


def connect(datadir: DataDir, *, start: bool = True, grace: float = 2.0, **settings: float | None) -> socket.socket:
    """Connect to the coordinator of `datadir`, starting one if none runs and `start`.

    `settings` (compact_min_bytes, checkpoint_bytes, flush_interval, reader_slots, busy_poll) configure a
    coordinator we start; one already running keeps its own.
    """
    sock = try_connect(datadir)
    if sock is not None:
        return sock
    if not start:
        raise CoordinatorError(f"no coordinator serves {datadir.path}; run `protobase serve {datadir.path}`")
    with FileLock(datadir.file("launch.lock")):
        sock = try_connect(datadir)
        if sock is None:
            _spawn(datadir, grace, settings)
            sock = _wait_for_socket(datadir)
    return sock


def _spawn(datadir: DataDir, grace: float, settings: dict[str, float | None]) -> None:
    command = [sys.executable, "-m", "protobase.coordinator", datadir.path, "--daemon", "--grace", str(grace)]
    for name, value in settings.items():
        if value is not None:
            command += [f"--{name.replace('_', '-')}", str(value)]
    # Make this very package importable in the child even when it is not installed.
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        env=env,
        stderr=subprocess.PIPE,
        timeout=START_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        kind, _, detail = result.stderr.decode(errors="replace").strip().partition("\n")
        error_class = getattr(errors, kind, None)
        if isinstance(error_class, type) and issubclass(error_class, errors.ProtoBaseError) and detail:
            raise error_class(detail)  # e.g. CorruptionError naming the damaged WAL file and offset
        raise CoordinatorError(f"could not start a coordinator for {datadir.path}: {kind} {detail}".strip())


def _wait_for_socket(datadir: DataDir) -> socket.socket:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        sock = try_connect(datadir)
        if sock is not None:
            return sock
        time.sleep(0.01)
    raise CoordinatorError(
        f"the coordinator for {datadir.path} started but does not accept connections; "
        f"see {datadir.file('coordinator.log')}"
    )
