"""Snapshots: read-only views of the database pinned to one sequence number.

A snapshot is a root pointer and a sequence number; taking one reads the
control segment's seqlock and writes this process's reader slot, and reading
through it never takes a lock nor talks to the coordinator. Everything it hands
out is read-only: writes raise ReadOnlyError. Runs in client processes; the
snapshot's pin is its session's (client/session.py), released once on close.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protobase.core.views import TreeDict
from protobase.errors import CoordinatorRestartedError, DatabaseClosedError

if TYPE_CHECKING:
    from protobase.client.session import Session

__all__ = ["Snapshot"]


class Snapshot:
    """A consistent read-only view; a context manager that releases it."""

    __slots__ = ("_session", "seq", "_root", "_epoch", "_pinned_by", "_closed", "__weakref__")

    def __init__(self, session: Session, seq: int, root: TreeDict, epoch: int) -> None:
        self._session = session
        self.seq = seq  # sequence number of the commit this snapshot shows
        self._root = root  # the root dict at that commit
        self._epoch = epoch  # the handle's epoch when pinned (see Session)
        self._pinned_by = session.pid  # a forked child that inherits the snapshot did not pin it
        self._closed = False

    @property
    def root(self) -> TreeDict:
        """The root mapping as of `seq`.

        Raises DatabaseClosedError once closed, CoordinatorRestartedError if the
        coordinator restarted since the snapshot was taken (its memory is gone).
        """
        if self._closed:
            raise DatabaseClosedError(f"snapshot {self.seq} is closed; take a new one with db.snapshot()")
        if self._epoch != self._session.epoch:
            raise CoordinatorRestartedError(
                f"snapshot {self.seq} was taken before the coordinator of {self._session.path} restarted, and its "
                f"shared memory is gone; take a new snapshot with db.snapshot()"
            )
        return self._root

    def close(self) -> None:
        """Release the snapshot, letting the coordinator reclaim what only it could reach. Idempotent."""
        if not self._closed:
            self._closed = True
            self._session.unpin(self.seq, self._epoch, self._pinned_by)

    @property
    def closed(self) -> bool:
        return self._closed

    def __del__(self) -> None:
        # A forgotten snapshot must not pin shared memory for the life of the process.
        try:
            self.close()
        except Exception:  # interpreter shutdown: the database may be gone already
            pass

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Snapshot seq={self.seq} {'closed' if self._closed else 'open'}>"
