"""Change notification: wait for commits that touch given keys, without polling.

Owns the watcher's connection. `db.watch(prefixes)` opens a connection of its
own to the coordinator and subscribes to key-path prefixes; the coordinator
pushes `(seq, paths)` when a commit touching one of them is published (a
"sync" commit: once durable), so a watcher blocks in `recv`, never spins.
A path touches a prefix when one starts with the other: watching ("users",)
sees `root["users"]["alice"]["city"] = ...` and `root["users"] = {}` alike.

Notifications are hints to re-read: take a snapshot at or after `seq`. A
watcher that falls behind is not dropped; the socket buffers its backlog. A
watcher outlives a coordinator restart: it subscribes again and reports the
gap as a change of the whole root.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from protobase.client import launcher
from protobase.client.connection import Connection
from protobase.core.datadir import FORMAT_VERSION, DataDir
from protobase.errors import CoordinatorError, DatabaseClosedError

__all__ = ["Change", "Watcher"]

RESUBSCRIBE_INTERVAL = 0.1  # seconds between attempts to reach a restarting coordinator


@dataclass(frozen=True)
class Change:
    """A published commit that touched a watched prefix."""

    seq: int  # its sequence number: a snapshot at or after it shows the change
    paths: tuple[tuple[Any, ...], ...]  # the written key paths that touched the prefixes


class Watcher:
    """An iterator of Change; `wait(timeout)` for one with a deadline. Close it (or use `with`).

    If the coordinator restarts, the watcher subscribes again by itself and
    yields one Change whose paths are `((),)` (the whole root): commits may
    have been published while it was away, so re-read what you watch.
    """

    def __init__(self, datadir: DataDir, prefixes: Iterable[Any]) -> None:
        self._datadir = datadir
        self._prefixes = [_prefix(prefix) for prefix in prefixes]
        self._connection: Connection | None = None
        self._closed = False
        self.seq = self._subscribe()  # the published seq when watching began

    def _subscribe(self) -> int:
        """Connect and subscribe; return the published seq at that moment."""
        connection = Connection(launcher.connect(self._datadir, start=False))
        try:
            reply = connection.request(["watch", FORMAT_VERSION, [list(prefix) for prefix in self._prefixes]])
        except BaseException:
            connection.close()
            raise
        if reply[0] != "ok":
            connection.close()
            raise CoordinatorError(f"the coordinator refused to watch: {reply}")
        self._connection = connection
        seq: int = reply[1]
        return seq

    def wait(self, timeout: float | None = None) -> Change | None:
        """The next change, or None after `timeout` seconds without one."""
        if self._closed:
            raise DatabaseClosedError("this watcher is closed; start a new one with db.watch()")
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._connection is None or self._connection.broken:
            return self._resubscribe(deadline)
        try:
            message = self._connection.wait_push(None if deadline is None else deadline - time.monotonic())
        except (OSError, CoordinatorError):
            return self._resubscribe(deadline)
        if message is None:
            return None
        return Change(message[1], tuple(tuple(path) for path in message[2]))

    def _resubscribe(self, deadline: float | None) -> Change | None:
        """After the connection was lost: subscribe again once a coordinator serves (or None at `deadline`)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        while True:
            try:
                return Change(self._subscribe(), ((),))
            except CoordinatorError:
                if deadline is not None and time.monotonic() >= deadline:
                    return None
                time.sleep(RESUBSCRIBE_INTERVAL)

    def __iter__(self) -> Iterator[Change]:
        while True:
            change = self.wait()
            if change is not None:
                yield change

    def close(self) -> None:
        self._closed = True
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _prefix(prefix: Any) -> tuple[Any, ...]:
    if isinstance(prefix, tuple):
        return prefix
    if isinstance(prefix, list):
        return tuple(prefix)
    return (prefix,)
