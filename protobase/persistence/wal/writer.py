"""Appending records to a WAL file: `WalWriter`, the persistence process's only way to write the log.

Owns the write side of a WAL file: creating it (header written and fsynced,
the directory fsynced), appending records in batches (group commit), fsync,
and the preallocated zeros after the last record. Runs in the persistence
process only, one writer at a time, guarded by its ``wal.lock``; the writer
itself takes no lock and refuses use from a forked child.

Invariants the writer keeps (and the reader relies on):
- The file never ends inside a record the writer reports as written: every
  failed write is cut back with ``ftruncate`` to the end of the last good
  record before the error is raised. Only a crash can leave a torn tail.
- While a writer has a file open, the file goes on past the last record with
  zeros the writer preallocated (`PREALLOCATE_BYTES` at a time, so that an
  fdatasync need not commit a new file length). Zeros read as a torn tail;
  `close` cuts them, and after a crash `open_for_append` does.
- After an fsync error the writer is dead for good (the fsyncgate lesson: the
  kernel may already have dropped the dirty pages and marked them clean, so a
  retried fsync would succeed and lie). Recover from what is on disk instead.

Every write and sync goes through `faults.pwrite` and `faults.fdatasync`, so
that tests can make them fail through these real code paths.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
from collections.abc import Sequence

from protobase.errors import CorruptionError, DatabaseClosedError, WalError, WalSyncError, WalWriteError
from protobase.persistence.wal import faults
from protobase.persistence.wal.files import fsync_directory, parse_wal_file_name, wal_file_name
from protobase.persistence.wal.format import (
    FILE_HEADER,
    FILE_HEADER_SIZE,
    MAGIC,
    MAX_LSN,
    MAX_PAYLOAD,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    SALT,
    VERSION,
    record_crc,
)
from protobase.persistence.wal.reader import RECOVER_HINT, scan

__all__ = ["PREALLOCATE_BYTES", "WalWriter"]

PREALLOCATE_BYTES = 1 << 20  # a writer grows its file by this many zeros at a time
WRITE_AS_IS = 64 << 10  # bytes of a record's part written from where it is, not copied into the batch's write


class WalWriter:
    """Appends records to one WAL file. Make one with `create` or `open_for_append`.

    One writer per file and per process: the persistence process holds
    ``wal.lock``; the writer refuses use from a forked child. `append` and
    `append_many` leave the file ending at a record boundary whatever fails;
    records are durable only after `sync`. A `WalSyncError` (or a failed cut
    after a write error) fails the writer: every later call raises it again.
    """

    def __init__(
        self, path: str, fd: int, salt: int, first_lsn: int, size: int, next_lsn: int, last_offset: int | None
    ) -> None:
        """Wrap an open descriptor. Internal: use `create` or `open_for_append`."""
        self._path = path  # the file, absolute if the directory given was
        self._fd: int | None = fd  # O_WRONLY | O_CLOEXEC, written with pwrite; None once closed
        self._salt = salt  # u64 from the file header
        self._first_lsn = first_lsn  # lsn of the file's first record
        self._size = size  # bytes of records (and header) in the file, always at a record boundary
        self._allocated = size  # the file's length: _size plus the zeros preallocated after it
        self._next_lsn = next_lsn  # lsn the next appended record gets
        self._last_offset = last_offset  # offset of the last record's header; None while the file has none
        self._synced_lsn = next_lsn - 1  # every record <= this is on disk (as of the last successful sync)
        self._failed: WalError | None = None  # the error that killed the writer
        self._pid = os.getpid()  # the process the descriptor belongs to

    @classmethod
    def create(cls, directory: str, first_lsn: int) -> WalWriter:
        """Create ``wal-<first_lsn>.log`` in `directory`, its header written and fsynced.

        The file is created exclusively with mode 0600; the directory is
        fsynced so the file survives a crash. On failure nothing is left
        behind. Raises WalWriteError (errno EEXIST if the file exists already:
        open it with `open_for_append`, or remove it if it is covered by a
        checkpoint) or WalSyncError (the header or the directory entry could
        not be fsynced).
        """
        if not 1 <= first_lsn <= MAX_LSN:
            raise ValueError(f"first_lsn must be in 1..2**64-1, got {first_lsn}")
        faults.apply_env_faults()
        path = os.path.join(directory, wal_file_name(first_lsn))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise WalWriteError(f"cannot create WAL file {path}: {error.strerror}", error.errno) from error
        salt = SALT.unpack(os.urandom(8))[0]
        error_class: type[WalError] = WalWriteError
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            _write_all(fd, FILE_HEADER.pack(MAGIC, VERSION, 0, salt, first_lsn), 0)
            error_class = WalSyncError
            faults.fdatasync(fd)
            fsync_directory(directory)
        except OSError as error:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise error_class(f"cannot create WAL file {path}: {error.strerror}", error.errno) from error
        return cls(path, fd, salt, first_lsn, FILE_HEADER_SIZE, first_lsn, None)

    @classmethod
    def open_for_append(cls, path: str) -> WalWriter:
        """Open an existing WAL file to append after its last valid record.

        A torn tail is cut (and the cut fsynced) first. A file shorter than
        its header (a crash while it was created) gets a fresh header with the
        first_lsn of its name. Raises CorruptionError if the header is wrong or
        valid records follow a damaged one (appending would bury them), and
        WalWriteError / WalSyncError if the repair cannot be written / synced.
        """
        result = scan(path)
        if result.corrupt:
            raise result.corruption_error()
        faults.apply_env_faults()
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        error_class: type[WalError] = WalWriteError
        try:
            if result.header_torn:
                first_lsn = parse_wal_file_name(path)
                if first_lsn is None:
                    raise CorruptionError(
                        f"{path} is shorter than a WAL file header and its name does not say its first lsn; "
                        f"remove it if it is empty, otherwise {RECOVER_HINT}"
                    )
                salt = SALT.unpack(os.urandom(8))[0]
                os.ftruncate(fd, 0)
                _write_all(fd, FILE_HEADER.pack(MAGIC, VERSION, 0, salt, first_lsn), 0)
                error_class = WalSyncError
                faults.fdatasync(fd)
                return cls(path, fd, salt, first_lsn, FILE_HEADER_SIZE, first_lsn, None)
            if result.torn:
                os.ftruncate(fd, result.good_end)
                error_class = WalSyncError
                faults.fdatasync(fd)
        except OSError as error:
            os.close(fd)
            message = f"cannot repair the torn end of WAL file {path}: {error.strerror}"
            raise error_class(message, error.errno) from error
        except BaseException:
            os.close(fd)
            raise
        assert result.salt is not None and result.first_lsn is not None and result.last_lsn is not None
        last_offset = result.records[-1].offset if result.records else None
        return cls(path, fd, result.salt, result.first_lsn, result.good_end, result.last_lsn + 1, last_offset)

    @property
    def path(self) -> str:
        """The WAL file's path."""
        return self._path

    @property
    def first_lsn(self) -> int:
        """The lsn of the file's first record (whether written yet or not)."""
        return self._first_lsn

    @property
    def next_lsn(self) -> int:
        """The lsn the next appended record gets."""
        return self._next_lsn

    @property
    def last_lsn(self) -> int:
        """The lsn of the last record written (first_lsn - 1 while the file has none)."""
        return self._next_lsn - 1

    @property
    def synced_lsn(self) -> int:
        """Every record with lsn <= synced_lsn was fsynced (or was on disk when the file was opened)."""
        return self._synced_lsn

    @property
    def size(self) -> int:
        """Bytes in the file, header included; always at a record boundary."""
        return self._size

    @property
    def closed(self) -> bool:
        """True after `close`."""
        return self._fd is None

    @property
    def failed(self) -> WalError | None:
        """The error that made this writer unusable, or None."""
        return self._failed

    def append(self, payload: bytes) -> int:
        """Write one record; return its lsn. Not durable until `sync`.

        Raises WalWriteError (the file is cut back to before the record),
        ValueError for a payload over MAX_PAYLOAD, DatabaseClosedError after
        `close`, or the error that failed the writer earlier.
        """
        return self.append_many([payload])

    def append_many(self, payloads: Sequence[bytes | list[bytes]]) -> int:
        """Write several records with one write (group commit); return the last lsn.

        A payload may be given as its parts (the fragments a large record
        came through the commit ring in), which are never joined: a part of
        `WRITE_AS_IS` bytes or more is written from where it is. All or
        nothing: on a write error none of the batch stays in the file. An
        empty list writes nothing and returns `last_lsn`.
        """
        fd = self._usable_fd()
        if not payloads:
            return self.last_lsn
        chunks: list[bytes] = []
        offset, lsn, prev = self._size, self._next_lsn, self._last_offset
        for payload in payloads:
            parts = payload if isinstance(payload, list) else [payload]
            length = sum(map(len, parts))
            if length > MAX_PAYLOAD:
                raise ValueError(f"WAL record payload of {length} bytes is over the {MAX_PAYLOAD}-byte limit")
            if lsn > MAX_LSN:
                raise ValueError(f"WAL lsn {lsn} does not fit in 64 bits")
            rest = RECORD_HEADER.pack(0, length, lsn, self._salt if prev is None else prev)[4:]
            chunks += [struct.pack("<I", record_crc(self._salt, rest, parts)), rest, *parts]
            prev, offset, lsn = offset, offset + RECORD_HEADER_SIZE + length, lsn + 1
        self._preallocate(fd, offset)
        try:
            _write_chunks(fd, chunks, self._size)
        except OSError as error:
            self._cut_back(fd, error, len(payloads))
        self._size, self._next_lsn, self._last_offset = offset, lsn, prev
        return lsn - 1

    def sync(self) -> None:
        """fdatasync the file: every record written so far is durable after it returns.

        Raises WalSyncError and fails the writer for good on any error.
        """
        fd = self._usable_fd()
        try:
            faults.fdatasync(fd)
        except OSError as error:
            self._failed = WalSyncError(
                f"fsync of WAL file {self._path} failed ({error.strerror}): records after lsn {self._synced_lsn} "
                f"may not be on disk; this writer is unusable, restart the database so it recovers from the WAL",
                error.errno,
            )
            raise self._failed from error
        self._synced_lsn = self.last_lsn

    def close(self) -> None:
        """Cut the preallocated zeros off and close the descriptor. Does not sync. Closing twice is harmless."""
        if self._fd is not None and self._pid == os.getpid():
            if self._allocated > self._size:
                with contextlib.suppress(OSError):  # the zeros would only read as a torn tail
                    os.ftruncate(self._fd, self._size)
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WalWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._fd is None else "failed" if self._failed else "open"
        return f"<WalWriter {self._path} {state} next_lsn={self._next_lsn} size={self._size}>"

    def _usable_fd(self) -> int:
        if self._fd is None:
            raise DatabaseClosedError(f"WAL writer for {self._path} is closed")
        if self._pid != os.getpid():
            raise DatabaseClosedError(
                f"WAL writer for {self._path} was opened by process {self._pid}; a forked child cannot use it"
            )
        if self._failed is not None:
            raise self._failed
        return self._fd

    def _preallocate(self, fd: int, end: int) -> None:
        """Make the file at least `end` bytes long, in PREALLOCATE_BYTES steps of zeros.

        Why: fdatasync after a write that grows the file must also commit the
        new length to the filesystem journal; within already allocated blocks
        it flushes only the data (measured 1.3x faster on ext4, see
        docs/performance-durability.md). The zeros read as a torn tail, which
        recovery cuts. If the disk refuses (full, or no fallocate support) the
        write itself extends the file, and reports ENOSPC if it must.
        """
        if end <= self._allocated:
            return
        target = -(-end // PREALLOCATE_BYTES) * PREALLOCATE_BYTES
        try:
            os.posix_fallocate(fd, self._allocated, target - self._allocated)
        except OSError:
            return
        self._allocated = target

    def _cut_back(self, fd: int, error: OSError, count: int) -> None:
        """After a failed write: cut the file to the last good record and raise WalWriteError."""
        what = f"cannot write {count} record(s) from lsn {self._next_lsn} to WAL file {self._path} ({error.strerror})"
        try:
            os.ftruncate(fd, self._size)
            self._allocated = self._size
        except OSError as cut_error:
            self._failed = WalWriteError(
                f"{what}, and cutting the partial record off failed too ({cut_error.strerror}); this writer is "
                f"unusable, restart the database so it recovers from the WAL",
                error.errno,
            )
            raise self._failed from error
        message = f"{what}; the file was cut back to lsn {self.last_lsn}"
        hint = "; free disk space and retry" if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise WalWriteError(message + hint, error.errno) from error


def _write_chunks(fd: int, chunks: list[bytes], offset: int) -> None:
    """Write `chunks` back to back from `offset`: the small ones joined into one write, the large ones as they are."""
    small: list[bytes] = []
    for chunk in chunks:
        if len(chunk) < WRITE_AS_IS:
            small.append(chunk)
            continue
        if small:
            joined = b"".join(small)
            _write_all(fd, joined, offset)
            offset, small = offset + len(joined), []
        _write_all(fd, chunk, offset)
        offset += len(chunk)
    if small:
        _write_all(fd, b"".join(small), offset)


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` at `offset` through `faults.pwrite`, looping over short writes; OSError if refused."""
    view = memoryview(data)
    while view:
        written = faults.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, "write wrote nothing")
        view, offset = view[written:], offset + written
