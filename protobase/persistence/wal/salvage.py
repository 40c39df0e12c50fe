"""Salvage: every intact record of a damaged WAL file, for `protobase recover`.

Owns the reading that does not stop at damage: unlike a scan, it resumes at
the next record that validates under the file's salt and reports the byte
ranges it skipped. Runs in the process of `protobase recover` (through
coordinator/recovery.py's `salvage`), never while a database starts: only a
user's explicit salvage may skip damage.

Invariant: a record is kept only if its crc matches under a salt some record
of the file proves, and its lsn is after the last one kept; the file header
is trusted only as far as the records prove it.
"""

from __future__ import annotations

from protobase.errors import CorruptionError
from protobase.persistence.wal.files import parse_wal_file_name
from protobase.persistence.wal.format import FILE_HEADER, FILE_HEADER_SIZE, RECORD_HEADER, RECORD_HEADER_SIZE, record_at
from protobase.persistence.wal.reader import WalRecord, check_file_header
from protobase.persistence.wal.search import find_valid_record

__all__ = ["salvage_records"]


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
    next_lsn: int = named_lsn if named_lsn is not None else FILE_HEADER.unpack(header)[4]
    salt = _proven_salt(data, next_lsn)
    if salt is None:
        return [], [(0, len(data))]
    records: list[WalRecord] = []
    skipped: list[tuple[int, int]] = [] if _header_is_intact(path, header, salt) else [(0, FILE_HEADER_SIZE)]
    offset = FILE_HEADER_SIZE
    while offset < len(data):
        found = record_at(data, offset, salt)
        if found is None and data[offset:] == bytes(len(data) - offset):
            break  # zeros a writer preallocated: the end of the log, not damage
        if found is None or found[1] < next_lsn:
            resume = find_valid_record(data, offset + 1, salt, next_lsn)
            skipped.append((offset, len(data) if resume is None else resume[0]))
            if resume is None:
                break
            offset = resume[0]
            continue
        length, lsn, _ = found
        start = offset + RECORD_HEADER_SIZE
        records.append(WalRecord(lsn, bytes(data[start : start + length]), offset))
        next_lsn, offset = lsn + 1, start + length
    return records, skipped


def _proven_salt(data: memoryview, first_lsn: int) -> int | None:
    """The salt a record of `data` validates under: the header's, or the one its first record names.

    The first record's prev field holds the salt, so a damaged header salt is
    found there; a damaged first record leaves the header's salt, proven by
    any later record. A match needs a crc collision under a random salt to be
    wrong. None when neither candidate is proven by a record.
    """
    header_salt: int = FILE_HEADER.unpack_from(data)[3]
    candidates = [header_salt]
    if len(data) >= FILE_HEADER_SIZE + RECORD_HEADER_SIZE:
        candidates.append(RECORD_HEADER.unpack_from(data, FILE_HEADER_SIZE)[3])
    for salt in candidates:
        if record_at(data, FILE_HEADER_SIZE, salt) is not None:
            return salt
    for salt in candidates:
        if find_valid_record(data, FILE_HEADER_SIZE, salt, first_lsn) is not None:
            return salt
    return None


def _header_is_intact(path: str, header: bytes, salt: int) -> bool:
    """True when every field of the file header is as the writer left it, `salt` included."""
    try:
        header_salt, _ = check_file_header(path, header)
    except CorruptionError:
        return False
    return header_salt == salt
