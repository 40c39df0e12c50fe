"""WAL file names, the listing of a directory's WAL files, and directory fsync.

Owns the names ``wal-<first_lsn as 16 lowercase hex digits>.log`` in the data
directory. The files of a directory continue each other: the first record of
a file has lsn == first_lsn == the previous file's last lsn + 1. Used by the
persistence process (which alone creates and removes WAL files), by recovery
in the coordinator and by the command line (which only list them).

Invariant: only names of that exact form are WAL files; anything else
(temporary files, files a user set aside) is ignored, never read or removed.
"""

from __future__ import annotations

import os
import re

__all__ = ["wal_file_name", "parse_wal_file_name", "list_wal_files", "remove_wal_files_before", "fsync_directory"]

_NAME = re.compile(r"wal-([0-9a-f]{16})\.log")


def wal_file_name(first_lsn: int) -> str:
    """The name of the WAL file whose first record is `first_lsn`: wal-000000000000002a.log."""
    return f"wal-{first_lsn:016x}.log"


def parse_wal_file_name(name: str) -> int | None:
    """The first_lsn encoded in a WAL file name, or None if `name` is not one."""
    match = _NAME.fullmatch(os.path.basename(name))
    return int(match.group(1), 16) if match else None


def list_wal_files(directory: str) -> list[tuple[int, str]]:
    """The WAL files of `directory` as (first_lsn, path), sorted by first_lsn.

    Only names of the exact form wal-<16 hex>.log count; anything else
    (temporary files, files a user set aside) is ignored.
    """
    found = []
    for name in os.listdir(directory):
        first_lsn = parse_wal_file_name(name)
        if first_lsn is not None:
            found.append((first_lsn, os.path.join(directory, name)))
    found.sort()
    return found


def remove_wal_files_before(directory: str, lsn: int) -> list[str]:
    """Remove the WAL files holding only records <= `lsn` (a checkpoint covers them).

    A file can go when the next file starts at or before lsn + 1: then every
    record of it is <= lsn. The last file is never removed. The directory is
    fsynced after a removal. Returns the removed paths, oldest first.
    """
    files = list_wal_files(directory)
    removed = []
    for (_, path), (next_first, _) in zip(files, files[1:]):
        if next_first > lsn + 1:
            break
        os.unlink(path)
        removed.append(path)
    if removed:
        fsync_directory(directory)
    return removed


def fsync_directory(path: str) -> None:
    """fsync a directory, so that files created, renamed or removed in it stay so after a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
