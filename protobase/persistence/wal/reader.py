"""Reading and validating WAL files: one file (`WalReader`, `scan`) or a whole directory.

Owns the reader's checks of a WAL file against the format (see `format`): the
file header, the chain of records (lsn +1, prev pointing back), and the
difference between a torn tail and damage in the middle. Runs in the
coordinator (recovery), the persistence process (reopening its file), and
the command line (`check`, `recover`). Holds no descriptor and takes no lock.

Invariants it checks:
- Only a crash can leave a torn tail (the writer cuts every failed write
  back to a record boundary), and so does the preallocated run of zeros a
  writer left behind: the reader ends at the last good record, and
  `WalWriter.open_for_append` cuts the rest.
- A bad record *followed* by a valid one is not a torn tail but damage in the
  middle of the log: it is reported (`ScanResult.corrupt_offset`, and
  `CorruptionError` in strict reads), never skipped.
- Across the files of a directory the LSNs continue without a gap; a gap
  raises `CorruptionError` naming the missing records and the remedy.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from protobase.errors import CorruptionError
from protobase.persistence.wal.files import list_wal_files, parse_wal_file_name
from protobase.persistence.wal.format import (
    FILE_HEADER,
    FILE_HEADER_SIZE,
    MAGIC,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    VERSION,
    record_at,
)
from protobase.persistence.wal.search import find_valid_record

__all__ = [
    "RECOVER_HINT",
    "WalRecord",
    "ScanResult",
    "WalReader",
    "check_file_header",
    "scan",
    "read_records",
    "read_directory",
]

RECOVER_HINT = "run `protobase recover` on the data directory to inspect and salvage it"


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
            f"{RECOVER_HINT} (keep a copy of the file first)"
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
        salt, first_lsn = check_file_header(self.path, data)
        return _scan_records(self.path, memoryview(data), salt, first_lsn)

    def records(self, after_lsn: int = 0, *, strict: bool = True) -> Iterator[tuple[int, bytes]]:
        """(lsn, payload) of the valid records with lsn > after_lsn; see `read_records`."""
        result = self.scan()
        if strict and result.corrupt:
            raise result.corruption_error()
        for record in result.records:
            if record.lsn > after_lsn:
                yield record.lsn, record.payload


def check_file_header(path: str, data: bytes) -> tuple[int, int]:
    """(salt, first_lsn) of the file header at the start of `data`, after checking every field.

    Raises CorruptionError naming `path`, the field and what to do: another
    magic (not a WAL file), another format version, a reserved field not 0, or
    a first_lsn that disagrees with the file's name.
    """
    magic, version, reserved, salt, first_lsn = FILE_HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptionError(
            f"{path} is not a ProtoBase WAL file (magic {magic!r}, expected {MAGIC!r}); "
            f"move it out of the data directory if it does not belong there, otherwise {RECOVER_HINT}"
        )
    if version != VERSION:
        raise CorruptionError(
            f"{path} is WAL format version {version}, this ProtoBase reads version {VERSION}; "
            f"open the database with the ProtoBase release that wrote it"
        )
    if reserved != 0:
        raise CorruptionError(
            f"{path} has a damaged file header (reserved field {reserved:#x}, expected 0); {RECOVER_HINT}"
        )
    named_lsn = parse_wal_file_name(path)
    if named_lsn is not None and named_lsn != first_lsn:
        raise CorruptionError(
            f"{path} has a damaged file header: first lsn {first_lsn} but its name says {named_lsn}; {RECOVER_HINT}"
        )
    return salt, first_lsn


def _scan_records(path: str, data: memoryview, salt: int, first_lsn: int) -> ScanResult:
    """Follow the chain of records from the file header; see `ScanResult`."""
    records: list[WalRecord] = []
    offset = FILE_HEADER_SIZE
    expected_lsn, expected_prev = first_lsn, salt
    while offset < len(data):
        found = record_at(data, offset, salt)
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
    resume = find_valid_record(data, offset, salt, expected_lsn)
    if resume is None:
        return ScanResult(path, salt, first_lsn, len(data), records, offset, torn=True)
    return ScanResult(
        path,
        salt,
        first_lsn,
        len(data),
        records,
        offset,
        torn=False,
        corrupt_offset=offset,
        resume_offset=resume[0],
        resume_lsn=resume[1],
    )


def _check_first_record(
    path: str, data: memoryview, salt: int, first_lsn: int, found: tuple[int, int, int] | None
) -> None:
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
        if prev == salt or record_at(data, FILE_HEADER_SIZE, prev) is None:
            return
        problem = f"salt {salt:#x} but its first record was written under salt {prev:#x}"
    else:
        _, lsn, prev = found
        problem = f"first lsn {first_lsn} but its first record is lsn {lsn}"
        if lsn == first_lsn:
            problem = f"salt {salt:#x} but its first record names {prev:#x} as the salt"
    raise CorruptionError(f"{path} has a damaged file header: {problem}; {RECOVER_HINT}")


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


def read_directory(
    directory: str, after_lsn: int = 0, *, strict: bool = True, origin: str | None = None
) -> Iterator[tuple[int, bytes]]:
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
