"""The WAL's byte format: file header, record header, checksum, limits.

Owns the layout of a WAL file and the one rule of what a record is; nothing
here does I/O. Imported by the writer (in the persistence process) and the
readers (recovery in the coordinator, `protobase check` and `recover`).

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

Invariant: a record is valid when its length fits the file, its crc matches,
its lsn is the next one and its prev points at the record before it
(`record_at` checks the first two; the reader the order). The crc is salted
with the file's random salt, so a record copied from another file (or a stale
one of an earlier file) never validates here.
"""

from __future__ import annotations

import struct
import zlib

__all__ = [
    "MAGIC",
    "VERSION",
    "FILE_HEADER",
    "RECORD_HEADER",
    "FILE_HEADER_SIZE",
    "RECORD_HEADER_SIZE",
    "MAX_PAYLOAD",
    "MAX_LSN",
    "SALT",
    "record_crc",
    "record_at",
]

MAGIC = b"PBWAL001"
VERSION = 1
FILE_HEADER = struct.Struct("<8sIIQQ")  # magic, version, reserved, salt, first_lsn
RECORD_HEADER = struct.Struct("<IIQQ")  # crc32, payload length, lsn, prev
FILE_HEADER_SIZE = FILE_HEADER.size  # 32
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 24
MAX_PAYLOAD = 1 << 30  # bytes; a larger payload is refused by the writer and is damage to the reader
MAX_LSN = (1 << 64) - 1
SALT = struct.Struct("<Q")  # the salt as the crc covers it: 8 bytes LE


def record_crc(salt: int, header_rest: memoryview | bytes, payload: memoryview | bytes | list[bytes]) -> int:
    """crc32 of salt (8 bytes LE) + header bytes 4..24 + payload (whole, or its parts in order)."""
    crc = zlib.crc32(header_rest, zlib.crc32(SALT.pack(salt)))
    if not isinstance(payload, list):
        return zlib.crc32(payload, crc)
    for part in payload:
        crc = zlib.crc32(part, crc)
    return crc


def record_at(data: memoryview, offset: int, salt: int) -> tuple[int, int, int] | None:
    """(length, lsn, prev) if a record at `offset` fits in `data` and its crc matches, else None.

    Says nothing about the record's place in the log: whether its lsn and
    prev continue the records before it is the reader's check.
    """
    if offset + RECORD_HEADER_SIZE > len(data):
        return None
    crc, length, lsn, prev = RECORD_HEADER.unpack_from(data, offset)
    end = offset + RECORD_HEADER_SIZE + length
    if length > MAX_PAYLOAD or end > len(data):
        return None
    rest, payload = data[offset + 4 : offset + RECORD_HEADER_SIZE], data[offset + RECORD_HEADER_SIZE : end]
    if record_crc(salt, rest, payload) != crc:
        return None
    return length, lsn, prev
