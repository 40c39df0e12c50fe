"""Finding the next valid WAL record after damage, at C speed.

Owns the search that tells a torn tail (nothing valid follows the last good
record) from damage in the middle of a log (a valid record follows a bad
one), used by the reader, and that lets salvage resume past damage. Pure
functions over bytes already read; run by whichever process reads the WAL.

Invariant: `find_valid_record` returns only a record whose crc matches under
the file's salt, and the first such record after the damage with an lsn in
range: the regular expression merely narrows the candidates, the crc
decides.
"""

from __future__ import annotations

import re

from protobase.persistence.wal.format import MAX_LSN, RECORD_HEADER_SIZE, record_at

__all__ = ["find_valid_record", "lsn_range_regex"]


def find_valid_record(data: memoryview, bad_offset: int, salt: int, next_lsn: int) -> tuple[int, int] | None:
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
    for match in lsn_range_regex(next_lsn, high).finditer(data, bad_offset):
        offset = match.start()
        found = record_at(data, offset, salt)
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


def lsn_range_regex(low: int, high: int) -> re.Pattern[bytes]:
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
