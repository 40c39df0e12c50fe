"""Checkpoints: the whole database state in one file, written beside the WAL.

Owns the checkpoint format. A checkpoint is a byte copy of the data segments
of the current generation as they stood at one commit, plus the root pointer
of that commit. Since AtomPointers name (segment index, offset), restoring the
bytes into segments with the same indexes makes every pointer valid again:
recovery is a copy, then a replay of the WAL records after `lsn`.

It is written by the persistence process from a snapshot the coordinator
keeps pinned (and, by `protobase recover`, into a new directory), to
`checkpoint-<lsn>.tmp`, fsynced, renamed to
`checkpoint-<lsn as 16 hex digits>.pb`, and the directory fsynced; only then
are older checkpoints and the WAL files it covers removed. It is read by
recovery in the coordinator and by the command line (`backup`, `status`).

Invariant: a `checkpoint-*.pb` file is complete and fsynced before it has
that name, so a crash leaves the previous checkpoints or the new one, never a
half-written one (a leftover `.tmp` is removed by `newest_checkpoint`).
Reading checks the magic, the version, the header's crc and, while
restoring, each segment's crc: damage is a CorruptionError naming the file.

Byte format (little-endian):

    offset size field
    0      8    magic b"PBCKPT01"
    8      4    u32 format version (1)
    12     4    u32 segment count N
    16     8    u64 salt (random)
    24     8    u64 LSN of the last WAL record the state includes
    32     8    u64 seq of the commit the state is
    40     8    u64 root AtomPointer
    48     8    u64 next data segment index
    56     4    u32 crc32 of bytes 0..56 and of the segment table
    60     4    reserved
    64     N*24 segment table: u64 index, u64 byte length, u32 crc32 of the bytes, u32 reserved
    ...         the segments' bytes, in table order
"""

from __future__ import annotations

import os
import re
import secrets
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from protobase.errors import CorruptionError

__all__ = [
    "Checkpoint",
    "write_checkpoint",
    "checkpoint_files",
    "read_checkpoint",
    "newest_checkpoint",
    "remove_checkpoints_before",
]

MAGIC = b"PBCKPT01"
VERSION = 1
_HEADER = struct.Struct("<8sIIQQQQQ")
_CRC = struct.Struct("<I4x")
_ENTRY = struct.Struct("<QQI4x")
HEADER_SIZE = _HEADER.size + _CRC.size
_NAME = re.compile(r"checkpoint-([0-9a-f]{16})\.pb")
CHUNK = 8 << 20  # bytes copied per write or read: segments are large, memory for copies is not


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint file header; `restore` copies its segments out."""

    path: str
    lsn: int
    seq: int
    root: int
    next_segment: int
    segments: tuple[tuple[int, int, int], ...]  # ((index, length, crc32), ...)

    def restore(self, make_segment: Callable[[int, int], memoryview]) -> None:
        """For each segment, `make_segment(index, length)` returns a buffer to fill."""
        with open(self.path, "rb") as file:
            file.seek(HEADER_SIZE + len(self.segments) * _ENTRY.size)
            for index, length, expected in self.segments:
                buffer = make_segment(index, length)
                crc = 0
                for start in range(0, length, CHUNK):
                    view = buffer[start : min(length, start + CHUNK)]
                    if file.readinto(view) != len(view):
                        raise CorruptionError(f"checkpoint {self.path} is truncated inside segment {index}")
                    crc = zlib.crc32(view, crc)
                if crc != expected:
                    raise CorruptionError(
                        f"checkpoint {self.path}: segment {index} fails its checksum; "
                        f"the file is damaged: run `protobase recover`"
                    )


def write_checkpoint(
    directory: str,
    *,
    lsn: int,
    seq: int,
    root: int,
    next_segment: int,
    segments: Iterable[tuple[int, memoryview]],
    fsync_directory: Callable[[str], None],
    progress: Callable[[int], None] | None = None,
) -> str:
    """Write, fsync and atomically publish a checkpoint; return its path."""
    segments = list(segments)
    table = b"".join(_ENTRY.pack(index, len(data), zlib.crc32(data)) for index, data in segments)
    header = _HEADER.pack(MAGIC, VERSION, len(segments), secrets.randbits(64), lsn, seq, root, next_segment)
    final = os.path.join(directory, f"checkpoint-{lsn:016x}.pb")
    temporary = final[:-3] + ".tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, header + _CRC.pack(zlib.crc32(table, zlib.crc32(header))) + table)
        written = 0
        for _, data in segments:
            for start in range(0, len(data), CHUNK):
                _write_all(fd, data[start : start + CHUNK])
            written += len(data)
            if progress is not None:
                progress(written)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temporary)
        raise
    os.close(fd)
    os.replace(temporary, final)
    fsync_directory(directory)
    return final


def _write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write all of `data`, looping over short writes (an error, ENOSPC say, raises OSError)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def checkpoint_files(directory: str) -> list[tuple[int, str]]:
    """(lsn, path) of every published checkpoint, oldest first."""
    found = []
    for name in os.listdir(directory):
        match = _NAME.fullmatch(name)
        if match:
            found.append((int(match.group(1), 16), os.path.join(directory, name)))
    return sorted(found)


def read_checkpoint(path: str) -> Checkpoint:
    """Validate a checkpoint's header and segment table."""
    with open(path, "rb") as file:
        head = file.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            raise CorruptionError(f"checkpoint {path} is truncated; run `protobase recover`")
        magic, version, count, _salt, lsn, seq, root, next_segment = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise CorruptionError(f"{path} is not a ProtoBase checkpoint (bad magic)")
        if version != VERSION:
            raise CorruptionError(
                f"checkpoint {path} has format version {version}, this ProtoBase reads "
                f"{VERSION}; open it with a matching release"
            )
        table = file.read(count * _ENTRY.size)
        (expected,) = _CRC.unpack_from(head, _HEADER.size)
        if len(table) != count * _ENTRY.size or zlib.crc32(table, zlib.crc32(head[: _HEADER.size])) != expected:
            raise CorruptionError(f"checkpoint {path} has a damaged header; run `protobase recover`")
    segments = tuple(_ENTRY.unpack_from(table, i * _ENTRY.size) for i in range(count))
    return Checkpoint(path, lsn, seq, root, next_segment, segments)


def newest_checkpoint(directory: str) -> Checkpoint | None:
    """The newest checkpoint, validated; None when there is none. Leftover temporaries are removed."""
    for name in os.listdir(directory):
        if name.startswith("checkpoint-") and name.endswith(".tmp"):
            os.unlink(os.path.join(directory, name))  # a checkpoint that never finished
    files = checkpoint_files(directory)
    return read_checkpoint(files[-1][1]) if files else None


def remove_checkpoints_before(directory: str, lsn: int, fsync_directory: Callable[[str], None]) -> int:
    """Remove checkpoints older than the one at `lsn`; return how many."""
    removed = 0
    for old_lsn, path in checkpoint_files(directory):
        if old_lsn < lsn:
            os.unlink(path)
            removed += 1
    if removed:
        fsync_directory(directory)
    return removed
