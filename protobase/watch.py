"""Change notification: wait for commits that touch given keys, without polling.

Owns the watcher's connection. `db.watch(prefixes)` opens a connection of its
own to the coordinator and subscribes to key-path prefixes; the coordinator
pushes `(seq, paths)` when a commit touching one of them is published (a
"sync" commit: once durable), so a watcher blocks in `recv`, never spins.
A path touches a prefix when one starts with the other: watching ("users",)
sees `root["users"]["alice"]["city"] = ...` and `root["users"] = {}` alike.

Notifications are hints to re-read: take a snapshot at or after `seq`. A
watcher that falls behind is not dropped; the socket buffers its backlog.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .coordinator import launcher
from .datadir import FORMAT_VERSION
from .errors import CoordinatorError, DatabaseClosedError
from .protocol import receive, send

if TYPE_CHECKING:
    from .database import Database

__all__ = ["Change", "Watcher"]


@dataclass(frozen=True)
class Change:
    """A published commit that touched a watched prefix."""

    seq: int  # its sequence number: a snapshot at or after it shows the change
    paths: tuple[tuple, ...]  # the written key paths that touched the prefixes


class Watcher:
    """An iterator of Change; `wait(timeout)` for one with a deadline. Close it (or use `with`)."""

    def __init__(self, db: Database, prefixes: Iterable[Any]) -> None:
        self._prefixes = [_prefix(prefix) for prefix in prefixes]
        self._sock: socket.socket | None = launcher.connect(db.datadir, start=False)
        try:
            send(self._sock, ["watch", FORMAT_VERSION, [list(prefix) for prefix in self._prefixes]])
            reply = receive(self._sock)
        except BaseException:
            self.close()
            raise
        if reply[0] != "ok":
            self.close()
            raise CoordinatorError(f"the coordinator refused to watch: {reply}")
        self.seq = reply[1]  # the published seq when watching began

    def wait(self, timeout: float | None = None) -> Change | None:
        """The next change, or None after `timeout` seconds without one."""
        if self._sock is None:
            raise DatabaseClosedError("this watcher is closed")
        self._sock.settimeout(timeout)
        try:
            message = receive(self._sock)
        except TimeoutError:
            return None
        except OSError as error:
            raise CoordinatorError(f"lost the coordinator while watching ({error})") from None
        return Change(message[1], tuple(tuple(path) for path in message[2]))

    def __iter__(self) -> Iterator[Change]:
        while True:
            change = self.wait()
            if change is not None:
                yield change

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Watcher:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _prefix(prefix: Any) -> tuple:
    if isinstance(prefix, tuple):
        return prefix
    if isinstance(prefix, list):
        return tuple(prefix)
    return (prefix,)
