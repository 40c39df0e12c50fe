"""Fault injection for the WAL: real code paths, switched on from tests.

Owns the two system calls every WAL file write and sync goes through,
`pwrite` and `fdatasync`, and the faults they may be told to inject in this
process: a short write then ENOSPC, an EIO from a sync, a slow sync. Tests
switch them on with `inject_faults` (in this process) or the environment
variable ``PROTOBASE_WAL_FAULTS`` (read by `apply_env_faults` when a writer
is made, so that it reaches a separate persistence process). Runs wherever a
`WalWriter` runs, in practice the persistence process. Also a gate that holds
every checkpoint before it is written while a file exists
(``PROTOBASE_CHECKPOINT_GATE``, `hold_checkpoint`): a checkpoint as slow as
a test needs, ended when the test says.

Invariant: with no fault set (the state of every process that was not told
otherwise), `pwrite` and `fdatasync` are exactly `os.pwrite` and
`os.fdatasync`. Budgets run across the writers of the process, so a
rotation to a new WAL file does not reset them.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

__all__ = [
    "FAULTS_ENV",
    "CHECKPOINT_GATE_ENV",
    "FaultState",
    "active",
    "pwrite",
    "fdatasync",
    "inject_faults",
    "apply_env_faults",
    "hold_checkpoint",
]

FAULTS_ENV = "PROTOBASE_WAL_FAULTS"
CHECKPOINT_GATE_ENV = "PROTOBASE_CHECKPOINT_GATE"
GATE_POLL = 0.01  # seconds between looks at the gate file

_ENV_KEYS = ("enospc_after", "fsync_error", "fsync_error_after", "fsync_delay_ms")


@dataclass
class FaultState:
    """What `pwrite` and `fdatasync` should do wrong in this process."""

    write_budget: int | None = None  # bytes `pwrite` may still write before ENOSPC; None: no limit
    sync_budget: int | None = None  # syncs `fdatasync` may still do before EIO; None: no limit
    sync_delay: float = 0.0  # seconds each sync takes first: a slow disk
    env_applied: str | None = None  # the PROTOBASE_WAL_FAULTS value already applied


active = FaultState()  # the faults in force in this process


def pwrite(fd: int, data: memoryview | bytes, offset: int) -> int:
    """os.pwrite, unless a fault is injected: then a short write, then ENOSPC."""
    budget = active.write_budget
    if budget is None:
        return os.pwrite(fd, data, offset)
    if budget <= 0:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")
    if len(data) > budget:
        data = data[:budget]
    written = os.pwrite(fd, data, offset)
    active.write_budget = budget - written
    return written


def fdatasync(fd: int) -> None:
    """os.fdatasync, unless a fault is injected: then EIO (or first a delay, as on a slow disk)."""
    if active.sync_delay:
        time.sleep(active.sync_delay)
    budget = active.sync_budget
    if budget is not None:
        if budget <= 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO) + " (injected)")
        active.sync_budget = budget - 1
    os.fdatasync(fd)


class inject_faults:
    """Make this process's WAL writes or syncs fail; a context manager or a plain setter.

    ``write_fail_after_bytes=N``: the next N bytes written to WAL files (file
    headers included) go through, then a write comes back short and the one
    after raises OSError(ENOSPC). ``sync_error=True``: every sync raises
    OSError(EIO); ``sync_fail_after=N``: N syncs succeed first. As a context
    manager the previous settings come back on exit; called bare, the
    settings stay until the next call (``inject_faults()`` clears them).

    >>> with inject_faults(sync_error=True):
    ...     pass
    """

    def __init__(
        self, write_fail_after_bytes: int | None = None, sync_error: bool = False, sync_fail_after: int | None = None
    ) -> None:
        self._previous = (active.write_budget, active.sync_budget)  # restored by __exit__
        active.write_budget = write_fail_after_bytes
        active.sync_budget = 0 if sync_error else sync_fail_after

    def __enter__(self) -> inject_faults:
        return self

    def __exit__(self, *exc_info: object) -> None:
        active.write_budget, active.sync_budget = self._previous


def apply_env_faults() -> None:
    """Apply PROTOBASE_WAL_FAULTS once per distinct value, e.g. "enospc_after=4096,fsync_error=1".

    Keys: ``enospc_after=N`` (bytes, file headers included),
    ``fsync_error=1`` (every sync fails), ``fsync_error_after=N`` (N syncs
    succeed first), ``fsync_delay_ms=N`` (every sync takes N ms more: a slow
    disk). Budgets run across the writers of the process, so a rotation does
    not reset them. Raises ValueError naming the item it cannot parse.
    """
    value = os.environ.get(FAULTS_ENV, "")
    if not value or value == active.env_applied:
        return
    settings: dict[str, int] = {}
    for item in value.split(","):
        key, sep, number = item.strip().partition("=")
        if key not in _ENV_KEYS or not sep or not number.isdigit():
            raise ValueError(
                f"{FAULTS_ENV}={value!r}: cannot parse {item!r}; use enospc_after=N, fsync_error=1, "
                f"fsync_error_after=N or fsync_delay_ms=N, separated by commas"
            )
        settings[key] = int(number)
    if "enospc_after" in settings:
        active.write_budget = settings["enospc_after"]
    if settings.get("fsync_error"):
        active.sync_budget = 0
    if "fsync_error_after" in settings:
        active.sync_budget = settings["fsync_error_after"]
    if "fsync_delay_ms" in settings:
        active.sync_delay = settings["fsync_delay_ms"] / 1000
    active.env_applied = value


def hold_checkpoint() -> None:
    """Return once the file PROTOBASE_CHECKPOINT_GATE names does not exist (at once when it is unset)."""
    gate = os.environ.get(CHECKPOINT_GATE_ENV)
    while gate and os.path.exists(gate):
        time.sleep(GATE_POLL)
