"""The write-ahead log: its byte format and all WAL file I/O.

Owns the files ``wal-<first_lsn as 16 lowercase hex digits>.log`` in the data
directory. Each holds a run of records with consecutive log sequence numbers
(LSNs); the files of a directory continue each other (the first record of a
file has lsn == first_lsn == the previous file's last lsn + 1). A payload is
opaque bytes: what a record means is the business of the persistence process
and of recovery.

Callers: the persistence process is the only writer (`WalWriter`), one at a
time, guarded by its ``wal.lock``. Recovery in the coordinator, `check` and
tools read (`scan`, `read_records`, `read_directory`). Nothing here takes a
lock.

Byte format (all integers little-endian, no padding anywhere)::

    file header, 32 bytes
    offset size field
    0      8    magic b"PBWAL001"
    8      4    u32 format version (1)
    12     4    u32 reserved, 0
    16     8    u64 salt: random, chosen when the file is created
    24     8    u64 first_lsn: lsn of the file's first record (also in its name)

    record, at offset 32 for the first one, then back to back
    offset size field
    0      4    u32 crc32 (zlib) of: salt as 8 bytes LE + bytes 4..24 of this
                header + the payload
    4      4    u32 payload length L, at most MAX_PAYLOAD (1 GiB)
    8      8    u64 lsn: first_lsn for the first record, then +1 each record
    16     8    u64 prev: byte offset in this file of the previous record's
                header; for the first record, the file's salt
    24     L    payload

Invariants the writer keeps and the reader checks:
- A record is valid when its length fits the file, its crc matches, its lsn
  is the next one and its prev points at the record before it. The crc is
  salted with the file's random salt, so a record copied from another file (or
  a stale one of an earlier file) never validates here.
- The file never ends inside a record the writer reports as written: every
  failed write is cut back with ``ftruncate`` to the end of the last good
  record before the error is raised. Only a crash can leave a torn tail, and
  the reader ends at the last good record; `WalWriter.open_for_append` cuts it.
- While a writer has a file open, the file goes on past the last record with
  zeros the writer preallocated (`PREALLOCATE_BYTES` at a time, so that an
  fdatasync need not commit a new file length). Zeros read as a torn tail;
  `close` cuts them, and after a crash `open_for_append` does.
- A bad record *followed* by a valid one is not a torn tail but damage in the
  middle of the log: it is reported (`ScanResult.corrupt_offset`, and
  `CorruptionError` in strict reads), never skipped.
- After an fsync error the writer is dead for good (the fsyncgate lesson: the
  kernel may already have dropped the dirty pages and marked them clean, so a
  retried fsync would succeed and lie). Recover from what is on disk instead.

Fault injection for tests goes through the real code paths: every write and
sync of a WAL file passes through the module functions `_write` and `_sync`,
which `inject_faults` (in this process) or the environment variable
``PROTOBASE_WAL_FAULTS`` (read when a writer is made, for a separate
persistence process) can make fail.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from protobase.errors import CorruptionError, DatabaseClosedError, WalError, WalSyncError, WalWriteError

__all__ = [
    "MAGIC",
    "VERSION",
    "FILE_HEADER_SIZE",
    "RECORD_HEADER_SIZE",
    "MAX_PAYLOAD",
    "FAULTS_ENV",
    "WalError",
    "WalWriteError",
    "WalSyncError",
    "WalRecord",
    "ScanResult",
    "WalReader",
    "WalWriter",
    "scan",
    "read_records",
    "read_directory",
    "wal_file_name",
    "parse_wal_file_name",
    "list_wal_files",
    "remove_wal_files_before",
    "fsync_directory",
    "inject_faults",
]

MAGIC = b"PBWAL001"
VERSION = 1
FILE_HEADER = struct.Struct("<8sIIQQ")  # magic, version, reserved, salt, first_lsn
RECORD_HEADER = struct.Struct("<IIQQ")  # crc32, payload length, lsn, prev
FILE_HEADER_SIZE = FILE_HEADER.size  # 32
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 24
MAX_PAYLOAD = 1 << 30  # bytes; a larger payload is refused by the writer and is damage to the reader
MAX_LSN = (1 << 64) - 1
PREALLOCATE_BYTES = 1 << 20  # a writer grows its file by this many zeros at a time

FAULTS_ENV = "PROTOBASE_WAL_FAULTS"

_SALT = struct.Struct("<Q")
_NAME = re.compile(r"wal-([0-9a-f]{16})\.log")
_RECOVER_HINT = "run `protobase recover` on the data directory to inspect and salvage it"


# ---------------------------------------------------------------------------
# Fault injection: real code paths, switched on from tests


@dataclass
class _Faults:
    """What `_write` and `_sync` should do wrong in this process."""

    write_budget: int | None = None  # bytes `_write` may still write before ENOSPC; None: no limit
    sync_budget: int | None = None  # syncs `_sync` may still do before EIO; None: no limit
    sync_delay: float = 0.0  # seconds each sync takes first: a slow disk


_faults = _Faults()
_env_faults_applied: str | None = None  # the PROTOBASE_WAL_FAULTS value already applied


def _write(fd: int, data: memoryview | bytes, offset: int) -> int:
    """os.pwrite, unless a fault is injected: then a short write, then ENOSPC."""
    budget = _faults.write_budget
    if budget is None:
        return os.pwrite(fd, data, offset)
    if budget <= 0:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")
    if len(data) > budget:
        data = data[:budget]
    written = os.pwrite(fd, data, offset)
    _faults.write_budget = budget - written
    return written


def _sync(fd: int) -> None:
    """os.fdatasync, unless a fault is injected: then EIO (or first a delay, as on a slow disk)."""
    if _faults.sync_delay:
        time.sleep(_faults.sync_delay)
    budget = _faults.sync_budget
    if budget is not None:
        if budget <= 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO) + " (injected)")
        _faults.sync_budget = budget - 1
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
        self._previous = (_faults.write_budget, _faults.sync_budget)
        _faults.write_budget = write_fail_after_bytes
        _faults.sync_budget = 0 if sync_error else sync_fail_after

    def __enter__(self) -> inject_faults:
        return self

    def __exit__(self, *exc_info: object) -> None:
        _faults.write_budget, _faults.sync_budget = self._previous


def _apply_env_faults() -> None:
    """Apply PROTOBASE_WAL_FAULTS once per distinct value, e.g. "enospc_after=4096,fsync_error=1".

    Keys: ``enospc_after=N`` (bytes, file headers included),
    ``fsync_error=1`` (every sync fails), ``fsync_error_after=N`` (N syncs
    succeed first), ``fsync_delay_ms=N`` (every sync takes N ms more: a slow
    disk). Budgets run across the writers of the process, so a rotation does
    not reset them.
    """
    global _env_faults_applied
    value = os.environ.get(FAULTS_ENV, "")
    if not value or value == _env_faults_applied:
        return
    settings: dict[str, int] = {}
    for item in value.split(","):
        key, sep, number = item.strip().partition("=")
        if key not in ("enospc_after", "fsync_error", "fsync_error_after", "fsync_delay_ms") or not sep \
                or not number.isdigit():
            raise ValueError(
                f"{FAULTS_ENV}={value!r}: cannot parse {item!r}; use enospc_after=N, fsync_error=1, "
                f"fsync_error_after=N or fsync_delay_ms=N, separated by commas"
            )
        settings[key] = int(number)
    if "enospc_after" in settings:
        _faults.write_budget = settings["enospc_after"]
    if settings.get("fsync_error"):
        _faults.sync_budget = 0
    if "fsync_error_after" in settings:
        _faults.sync_budget = settings["fsync_error_after"]
    if "fsync_delay_ms" in settings:
        _faults.sync_delay = settings["fsync_delay_ms"] / 1000
    _env_faults_applied = value


# ---------------------------------------------------------------------------
# File names and directories


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


# ---------------------------------------------------------------------------
# Reading


class WalRecord(NamedTuple):
    """One valid record: unpacks as (lsn, payload, offset of its header in the file)."""

    lsn: int
    payload: bytes
    offset: int


@dataclass(frozen=True)
class ScanResult:
    """What one pass over a WAL file found.

    ``records`` are the valid records from the start up to the first bad one.
    ``good_end`` is the offset just after the last of them (where an appender
    continues). ``torn`` is True when bytes after ``good_end`` hold nothing
    valid: a crash cut a write short, and cutting the file at ``good_end``
    loses nothing that was ever complete. ``corrupt_offset`` is the offset of
    a bad record that is followed by a valid record (at ``resume_offset``,
    lsn ``resume_lsn``): damage in the middle, which must not be cut away
    silently. ``header_torn``: the file is shorter than its header (a crash
    while it was created), so it holds no records, and ``salt`` and
    ``first_lsn`` are None.
    """

    path: str
    salt: int | None
    first_lsn: int | None
    file_size: int
    records: list[WalRecord] = field(repr=False)
    good_end: int
    torn: bool
    corrupt_offset: int | None = None
    resume_offset: int | None = None
    resume_lsn: int | None = None

    @property
    def header_torn(self) -> bool:
        """True when the file is shorter than its 32-byte header."""
        return self.salt is None

    @property
    def last_lsn(self) -> int | None:
        """The lsn of the last valid record, first_lsn - 1 if none, None if the header is torn."""
        if self.records:
            return self.records[-1].lsn
        return None if self.first_lsn is None else self.first_lsn - 1

    @property
    def corrupt(self) -> bool:
        """True when a bad record is followed by a valid one."""
        return self.corrupt_offset is not None

    def corruption_error(self) -> CorruptionError:
        """The CorruptionError describing ``corrupt_offset``: what, where, and what to do."""
        return CorruptionError(
            f"WAL file {self.path} is corrupt at offset {self.corrupt_offset}: the record there is damaged "
            f"but valid records follow it (lsn {self.resume_lsn} at offset {self.resume_offset}), so cutting "
            f"the log there would lose committed transactions; the database will not start from it: "
            f"{_RECOVER_HINT} (keep a copy of the file first)"
        )


class WalReader:
    """Reads and validates one WAL file. Holds no descriptor between calls.

    The file is read whole into memory; the persistence process rotates files
    at a bounded size. Reading a file a writer is appending to sees a prefix of
    it, possibly with a torn tail.
    """

    def __init__(self, path: str) -> None:
        self.path = path  # the file read

    def scan(self) -> ScanResult:
        """Validate the whole file; see `ScanResult`.

        Raises CorruptionError when the file header is wrong (not a WAL file,
        another format version, a damaged header field), naming the file and
        saying what to do. Damaged records do not raise: they end the scan and
        are described in the result.
        """
        with open(self.path, "rb") as file:
            data = file.read()
        if len(data) < FILE_HEADER_SIZE:
            return ScanResult(self.path, None, None, len(data), [], 0, torn=len(data) > 0)
        salt, first_lsn = self._check_file_header(data)
        return _scan_records(self.path, memoryview(data), salt, first_lsn)

    def records(self, after_lsn: int = 0, *, strict: bool = True) -> Iterator[tuple[int, bytes]]:
        """(lsn, payload) of the valid records with lsn > after_lsn; see `read_records`."""
        result = self.scan()
        if strict and result.corrupt:
            raise result.corruption_error()
        for record in result.records:
            if record.lsn > after_lsn:
                yield record.lsn, record.payload

    def _check_file_header(self, data: bytes) -> tuple[int, int]:
        magic, version, reserved, salt, first_lsn = FILE_HEADER.unpack_from(data)
        if magic != MAGIC:
            raise CorruptionError(
                f"{self.path} is not a ProtoBase WAL file (magic {magic!r}, expected {MAGIC!r}); "
                f"move it out of the data directory if it does not belong there, otherwise {_RECOVER_HINT}"
            )
        if version != VERSION:
            raise CorruptionError(
                f"{self.path} is WAL format version {version}, this ProtoBase reads version {VERSION}; "
                f"open the database with the ProtoBase release that wrote it"
            )
        if reserved != 0:
            raise CorruptionError(
                f"{self.path} has a damaged file header (reserved field {reserved:#x}, expected 0); {_RECOVER_HINT}"
            )
        named_lsn = parse_wal_file_name(self.path)
        if named_lsn is not None and named_lsn != first_lsn:
            raise CorruptionError(
                f"{self.path} has a damaged file header: first lsn {first_lsn} but its name says {named_lsn}; "
                f"{_RECOVER_HINT}"
            )
        return salt, first_lsn


def salvage_records(path: str) -> tuple[list[WalRecord], list[tuple[int, int]]]:
    """Every intact record of a possibly damaged file, and the byte ranges skipped.

    For `protobase recover`: unlike a scan, it does not stop at damage but
    resumes at the next record that validates under the file's salt. The file
    header is trusted only as far as the records prove it (`_proven_salt`): a
    damaged header field costs the header (one skipped range), not the
    records. A file in which no record proves a salt yields nothing.
    """
    with open(path, "rb") as file:
        data = memoryview(file.read())
    if len(data) < FILE_HEADER_SIZE:
        return [], [(0, len(data))] if len(data) else []
    header = bytes(data[:FILE_HEADER_SIZE])
    named_lsn = parse_wal_file_name(path)
    next_lsn = named_lsn if named_lsn is not None else FILE_HEADER.unpack(header)[4]
    salt = _proven_salt(data, next_lsn)
    if salt is None:
        return [], [(0, len(data))]
    records: list[WalRecord] = []
    skipped: list[tuple[int, int]] = [] if _header_is_intact(path, header, salt) else [(0, FILE_HEADER_SIZE)]
    offset = FILE_HEADER_SIZE
    while offset < len(data):
        found = _valid_at(data, offset, salt)
        if found is None and data[offset:] == bytes(len(data) - offset):
            break  # zeros a writer preallocated: the end of the log, not damage
        if found is None or found[1] < next_lsn:
            resume = _find_valid_record(data, offset + 1, salt, next_lsn)

            skipped.append((offset, len(data) if resume is None else resume[0]))
            if resume is None:
                break
            offset = resume[0]
            continue
        length, lsn, _ = found
        start = offset + RECORD_HEADER_SIZE
        records.append(WalRecord(lsn, bytes(data[start:start + length]), offset))
        next_lsn, offset = lsn + 1, start + length
    return records, skipped


def _proven_salt(data: memoryview, first_lsn: int) -> int | None:
    """The salt a record of `data` validates under: the header's, or the one its first record names.

    The first record's prev field holds the salt, so a damaged header salt is
    found there; a damaged first record leaves the header's salt, proven by
    any later record. A match needs a crc collision under a random salt to be
    wrong. None when neither candidate is proven by a record.
    """
    header_salt = FILE_HEADER.unpack_from(data)[3]
    candidates = [header_salt]
    if len(data) >= FILE_HEADER_SIZE + RECORD_HEADER_SIZE:
        candidates.append(RECORD_HEADER.unpack_from(data, FILE_HEADER_SIZE)[3])
    for salt in candidates:
        if _valid_at(data, FILE_HEADER_SIZE, salt) is not None:
            return salt
    for salt in candidates:
        if _find_valid_record(data, FILE_HEADER_SIZE, salt, first_lsn) is not None:
            return salt
    return None


def _header_is_intact(path: str, header: bytes, salt: int) -> bool:
    """True when every field of the file header is as the writer left it, `salt` included."""
    try:
        header_salt, _ = WalReader(path)._check_file_header(header)
    except CorruptionError:
        return False
    return header_salt == salt


def _record_crc(salt: int, header_rest: memoryview | bytes, payload: memoryview | bytes) -> int:
    """crc32 of salt (8 bytes LE) + header bytes 4..24 + payload."""
    return zlib.crc32(payload, zlib.crc32(header_rest, zlib.crc32(_SALT.pack(salt))))


def _valid_at(data: memoryview, offset: int, salt: int) -> tuple[int, int, int] | None:
    """(length, lsn, prev) if a record at `offset` fits in `data` and its crc matches, else None."""
    if offset + RECORD_HEADER_SIZE > len(data):
        return None
    crc, length, lsn, prev = RECORD_HEADER.unpack_from(data, offset)
    end = offset + RECORD_HEADER_SIZE + length
    if length > MAX_PAYLOAD or end > len(data):
        return None
    rest, payload = data[offset + 4 : offset + RECORD_HEADER_SIZE], data[offset + RECORD_HEADER_SIZE : end]
    if _record_crc(salt, rest, payload) != crc:
        return None
    return length, lsn, prev


def _scan_records(path: str, data: memoryview, salt: int, first_lsn: int) -> ScanResult:
    records: list[WalRecord] = []
    offset = FILE_HEADER_SIZE
    expected_lsn, expected_prev = first_lsn, salt
    while offset < len(data):
        found = _valid_at(data, offset, salt)
        if found is None or found[1] != expected_lsn or found[2] != expected_prev:
            if not records:
                _check_first_record(path, data, salt, first_lsn, found)
            break
        length, lsn, _ = found
        start = offset + RECORD_HEADER_SIZE
        records.append(WalRecord(lsn, bytes(data[start : start + length]), offset))
        expected_lsn, expected_prev = lsn + 1, offset
        offset = start + length
    if offset >= len(data):
        return ScanResult(path, salt, first_lsn, len(data), records, offset, torn=False)
    resume = _find_valid_record(data, offset, salt, expected_lsn)
    if resume is None:
        return ScanResult(path, salt, first_lsn, len(data), records, offset, torn=True)
    return ScanResult(path, salt, first_lsn, len(data), records, offset, torn=False,
                      corrupt_offset=offset, resume_offset=resume[0], resume_lsn=resume[1])


def _check_first_record(path: str, data: memoryview, salt: int, first_lsn: int, found: tuple | None) -> None:
    """Tell a damaged file header from a damaged first record.

    The first record's prev field holds the salt and its lsn the first_lsn. If
    the record is intact (its crc matches under the salt it names) but those
    disagree with the file header, the header is what was damaged: cutting the
    file after it would throw away every record, so raise instead.
    """
    if found is None:
        if len(data) < FILE_HEADER_SIZE + RECORD_HEADER_SIZE:
            return
        _, _, lsn, prev = RECORD_HEADER.unpack_from(data, FILE_HEADER_SIZE)
        if prev == salt or _valid_at(data, FILE_HEADER_SIZE, prev) is None:
            return
        problem = f"salt {salt:#x} but its first record was written under salt {prev:#x}"
    else:
        _, lsn, prev = found
        problem = f"first lsn {first_lsn} but its first record is lsn {lsn}"
        if lsn == first_lsn:
            problem = f"salt {salt:#x} but its first record names {prev:#x} as the salt"
    raise CorruptionError(f"{path} has a damaged file header: {problem}; {_RECOVER_HINT}")


def _find_valid_record(data: memoryview, bad_offset: int, salt: int, next_lsn: int) -> tuple[int, int] | None:
    """(offset, lsn) of the first valid record at or after `bad_offset` with lsn >= next_lsn, else None.

    Searched byte by byte: the damage may have destroyed the lengths that
    lead from one record to the next. Any record that follows has lsn in
    [next_lsn, next_lsn + remaining bytes // 24], so a regular expression over
    that range of u64 values finds the candidates at C speed (runs of zeros,
    the usual torn tail, never match), and only those pay for a crc. A match
    that is not a real record of this file would need a crc collision under
    the file's random salt.
    """
    high = min(next_lsn + (len(data) - bad_offset) // RECORD_HEADER_SIZE, MAX_LSN)
    if next_lsn > high:
        return None
    for match in _lsn_range_regex(next_lsn, high).finditer(data, bad_offset):
        offset = match.start()
        found = _valid_at(data, offset, salt)
        if found is not None:
            return offset, found[1]
    return None


def _u64_range_classes(low: bytes, high: bytes) -> list[list[tuple[int, int]]]:
    """Sequences of byte ranges (big-endian order) matching exactly the numbers in [low, high]."""
    if not low:
        return [[]]
    if low[0] == high[0]:
        return [[(low[0], low[0]), *rest] for rest in _u64_range_classes(low[1:], high[1:])]
    width = len(low) - 1
    zeros, ones, anything = bytes(width), b"\xff" * width, [(0, 255)] * width
    sequences = []
    middle_low, middle_high = low[0], high[0]
    if low[1:] != zeros:
        sequences += [[(low[0], low[0]), *rest] for rest in _u64_range_classes(low[1:], ones)]
        middle_low += 1
    tail = []
    if high[1:] != ones:
        tail = [[(high[0], high[0]), *rest] for rest in _u64_range_classes(zeros, high[1:])]
        middle_high -= 1
    if middle_low <= middle_high:
        sequences.append([(middle_low, middle_high), *anything])
    return sequences + tail


def _lsn_range_regex(low: int, high: int) -> re.Pattern[bytes]:
    """A pattern matching (zero width) at each offset where a record header with low <= lsn <= high could start."""
    alternatives = []
    for sequence in _u64_range_classes(low.to_bytes(8, "big"), high.to_bytes(8, "big")):
        parts = []
        for first, last in reversed(sequence):  # the lsn is stored little-endian
            if (first, last) == (0, 255):
                parts.append(b".")
            elif first == last:
                parts.append(b"\\x%02x" % first)
            else:
                parts.append(b"[\\x%02x-\\x%02x]" % (first, last))
        alternatives.append(b"".join(parts))
    return re.compile(b"(?=.{8}(?:" + b"|".join(alternatives) + b"))", re.DOTALL)


def scan(path: str) -> ScanResult:
    """Validate the WAL file at `path`; shorthand for ``WalReader(path).scan()``."""
    return WalReader(path).scan()


def read_records(path: str, after_lsn: int = 0, *, strict: bool = True) -> Iterator[tuple[int, bytes]]:
    """Yield (lsn, payload) of the valid records of one file with lsn > after_lsn.

    A torn tail just ends the iteration (the writer cuts it when it reopens
    the file). With ``strict`` (the default) a damaged record followed by
    valid ones raises CorruptionError naming the file and the offset before
    anything is yielded; with ``strict=False`` the records before the damage
    are yielded (salvage). The file is validated whole before the first yield.
    """
    return WalReader(path).records(after_lsn, strict=strict)


def read_directory(directory: str, after_lsn: int = 0, *, strict: bool = True,
                   origin: str | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield (lsn, payload) with lsn > after_lsn from all WAL files of `directory`, in order.

    This is what recovery replays after loading a checkpoint at `after_lsn`;
    `origin` names that state in error messages (e.g. the checkpoint file).
    Files wholly at or before after_lsn are not read. Besides the checks of
    `read_records`, the LSNs must continue from one file to the next and the
    first record replayed must be after_lsn + 1: a gap means records were lost
    and raises CorruptionError with ``strict`` (else the iteration stops
    before the gap). A file's name proves where it starts even when its
    header is torn, so such a file is checked for a gap too. A torn tail is
    allowed in any file whose successor starts right after its last good
    record (the writer moved on after a crash).
    """
    files = list_wal_files(directory)
    expected = after_lsn + 1
    previous_path: str | None = None  # the file holding record expected - 1; None while that is the start state
    for index, (first_lsn, path) in enumerate(files):
        if index + 1 < len(files) and files[index + 1][0] <= expected:
            continue  # every record of this file is <= after_lsn
        if first_lsn > expected:
            if not strict:
                return
            if previous_path is not None:
                before = f"the WAL file {previous_path} ends at lsn {expected - 1}, but the next one"
            else:
                start = origin or f"the state at lsn {after_lsn}"
                before = f"recovery starts from {start}, but the {'next' if index else 'first'} WAL file"
            raise _gap_error(directory, expected, first_lsn, path, before)
        result = scan(path)
        if result.header_torn:
            continue
        if strict and result.corrupt:
            raise result.corruption_error()
        for record in result.records:
            if record.lsn >= expected:
                yield record.lsn, record.payload
                expected, previous_path = record.lsn + 1, path
        if result.corrupt:
            return


def _gap_error(directory: str, expected: int, first_lsn: int, path: str, before: str) -> CorruptionError:
    """The CorruptionError for WAL records expected..first_lsn-1 missing before the file `path`."""
    return CorruptionError(
        f"WAL records {expected}..{first_lsn - 1} are missing: {before}, {path}, starts at lsn {first_lsn}. "
        f"A checkpoint-*.pb or wal-*.log file moved or deleted does this: put it back and open again; "
        f"otherwise `protobase recover {directory} NEW_DIR` salvages the commits before the gap "
        f"(and `--past-gaps` those after it)"
    )


# ---------------------------------------------------------------------------
# Writing


class WalWriter:
    """Appends records to one WAL file. Make one with `create` or `open_for_append`.

    One writer per file and per process: the persistence process holds
    ``wal.lock``; the writer refuses use from a forked child. `append` and
    `append_many` leave the file ending at a record boundary whatever fails;
    records are durable only after `sync`. A `WalSyncError` (or a failed cut
    after a write error) fails the writer: every later call raises it again.
    """

    def __init__(self, path: str, fd: int, salt: int, first_lsn: int, size: int, next_lsn: int,
                 last_offset: int | None) -> None:
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
        _apply_env_faults()
        path = os.path.join(directory, wal_file_name(first_lsn))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise WalWriteError(f"cannot create WAL file {path}: {error.strerror}", error.errno) from error
        salt = _SALT.unpack(os.urandom(8))[0]
        error_class: type[WalError] = WalWriteError
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            _write_all(fd, FILE_HEADER.pack(MAGIC, VERSION, 0, salt, first_lsn), 0)
            error_class = WalSyncError
            _sync(fd)
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
        _apply_env_faults()
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        error_class: type[WalError] = WalWriteError
        try:
            if result.header_torn:
                first_lsn = parse_wal_file_name(path)
                if first_lsn is None:
                    raise CorruptionError(
                        f"{path} is shorter than a WAL file header and its name does not say its first lsn; "
                        f"remove it if it is empty, otherwise {_RECOVER_HINT}"
                    )
                salt = _SALT.unpack(os.urandom(8))[0]
                os.ftruncate(fd, 0)
                _write_all(fd, FILE_HEADER.pack(MAGIC, VERSION, 0, salt, first_lsn), 0)
                error_class = WalSyncError
                _sync(fd)
                return cls(path, fd, salt, first_lsn, FILE_HEADER_SIZE, first_lsn, None)
            if result.torn:
                os.ftruncate(fd, result.good_end)
                error_class = WalSyncError
                _sync(fd)
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

    def append_many(self, payloads: list[bytes]) -> int:
        """Write several records with one write (group commit); return the last lsn.

        All or nothing: on a write error none of the batch stays in the file.
        An empty list writes nothing and returns `last_lsn`.
        """
        fd = self._usable_fd()
        if not payloads:
            return self.last_lsn
        chunks = []
        offset, lsn, prev = self._size, self._next_lsn, self._last_offset
        for payload in payloads:
            length = len(payload)
            if length > MAX_PAYLOAD:
                raise ValueError(f"WAL record payload of {length} bytes is over the {MAX_PAYLOAD}-byte limit")
            if lsn > MAX_LSN:
                raise ValueError(f"WAL lsn {lsn} does not fit in 64 bits")
            rest = RECORD_HEADER.pack(0, length, lsn, self._salt if prev is None else prev)[4:]
            chunks += [struct.pack("<I", _record_crc(self._salt, rest, payload)), rest, payload]
            prev, offset, lsn = offset, offset + RECORD_HEADER_SIZE + length, lsn + 1
        self._preallocate(fd, offset)
        try:
            _write_all(fd, b"".join(chunks), self._size)
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
            _sync(fd)
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


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """Write all of `data` at `offset` through `_write`, looping over short writes; OSError if the disk refuses."""
    view = memoryview(data)
    while view:
        written = _write(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, "write wrote nothing")
        view, offset = view[written:], offset + written
