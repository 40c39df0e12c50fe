"""The one error hierarchy of ProtoBase.

Every error a user can see derives from `ProtoBaseError`. Errors are sorted by
cause, as trio does: the caller misused a handle (`DatabaseClosedError`,
`ReadOnlyError`), the data cannot be stored (`EncodingError`), another commit
won (`ConflictError`, retryable), the other side died (`CoordinatorError`),
bytes on disk / in shared memory are wrong (`CorruptionError`), or the disk
refused to write or sync the write-ahead log (`WalError`).

Every class is picklable with its arguments, so errors cross process
boundaries (worker pools, the coordinator's replies) unchanged. Messages say
what happened, with the identifying values, and what to do about it.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ProtoBaseError",
    "ConflictError",
    "ReadOnlyError",
    "EncodingError",
    "DatabaseClosedError",
    "CorruptionError",
    "CoordinatorError",
    "CoordinatorRestartedError",
    "OutcomeUnknownError",
    "ProtocolError",
    "DataDirectoryError",
    "PathError",
    "WorkerDiedError",
    "WalError",
    "WalWriteError",
    "WalSyncError",
]


class ProtoBaseError(Exception):
    """Base class of every error ProtoBase raises on purpose."""

    #: True when running the same transaction again may succeed.
    retryable: bool = False


class ConflictError(ProtoBaseError):
    """Another transaction committed a change to a key this one wrote (or read).

    Carries the key path, the sequence number the transaction was based on and
    the sequence number of the commit that changed the key. Retry the whole
    transaction: `@db.transactional(retries=N)` or `db.attempts(retries=N)`.
    """

    retryable = True

    def __init__(self, path: tuple[Any, ...], base_seq: int, conflicting_seq: int) -> None:
        self.path = tuple(path)
        self.base_seq = base_seq
        self.conflicting_seq = conflicting_seq
        super().__init__(path, base_seq, conflicting_seq)

    def __str__(self) -> str:
        return (
            f"key {format_path(self.path)} was changed by commit {self.conflicting_seq} "
            f"after this transaction's snapshot {self.base_seq}; retry the transaction "
            f"(use @db.transactional(retries=N) or db.attempts(retries=N))"
        )


class ReadOnlyError(ProtoBaseError, TypeError):
    """A write was attempted on a value read from a snapshot (or a closed transaction)."""


class EncodingError(ProtoBaseError, TypeError):
    """A value cannot be stored: unsupported type, at a given place inside the value."""


class DatabaseClosedError(ProtoBaseError):
    """The database, transaction or snapshot was used after it was closed."""


class CorruptionError(ProtoBaseError):
    """Stored bytes (shared memory, WAL, checkpoint) fail a structural check."""


class CoordinatorError(ProtoBaseError):
    """The coordinator could not be reached, refused us, or died."""


class CoordinatorRestartedError(CoordinatorError):
    """The coordinator restarted while a transaction or snapshot of the previous one was open.

    Nothing of the transaction was committed: the new coordinator cannot
    check it for conflicts against history it never saw. Retryable: run the
    transaction again (`@db.transactional` and `db.attempts` do), or take a new
    snapshot; the database handle has already reattached.
    """

    retryable = True


class OutcomeUnknownError(CoordinatorError):
    """A commit was sent, but the connection was lost before its answer came: it may or may not have committed.

    Not retryable blindly (running it again could apply it twice): read the
    data in a new snapshot to see whether it is there.
    """


class ProtocolError(ProtoBaseError):
    """A message on the coordinator's socket broke the wire protocol (a foreign client, or a bug)."""


class DataDirectoryError(ProtoBaseError):
    """The data directory is unusable: not a directory, wrong owner or mode, other version."""


class PathError(ProtoBaseError):
    """A commit's operation names a path that does not lead to a container in the current root."""


class WorkerDiedError(ProtoBaseError):
    """A pool worker died while it held a task; it has been replaced, the call failed."""


# ---------------------------------------------------------------------------
# The write-ahead log (raised in the persistence process by
# protobase.persistence.wal; reported to the coordinator as text)


class WalError(ProtoBaseError):
    """Writing or syncing a WAL file failed. Carries the OS errno (or None)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        self.message = message
        self.errno = errno
        super().__init__(message, errno)

    def __str__(self) -> str:
        return self.message


class WalWriteError(WalError):
    """A record could not be written (ENOSPC, EIO, ...). The file holds no part of it.

    The writer stays usable unless the cut back to the last good record failed
    too (then it is failed, and says so).
    """


class WalSyncError(WalError):
    """fdatasync of a WAL file failed: records since the last good sync may be lost.

    The writer is failed for good: never retry the sync and go on.
    """


def format_path(path: tuple[Any, ...]) -> str:
    """Render a key path the way Python would index it: root['users']['alice']."""
    return "root" + "".join(f"[{key!r}]" for key in path)
