"""Tests of protobase/persistence/checkpoint.py: checkpoint files written, read back, listed, removed, damaged.

Pure file tests in tmp_path: no database, no coordinator. Segments are plain
bytearrays; a checkpoint is only bytes and a root pointer to this module.
"""

from __future__ import annotations

import os
import re
import stat
import struct
import zlib

import pytest

from protobase.errors import CorruptionError
from protobase.persistence import checkpoint
from protobase.persistence.checkpoint import (
    HEADER_SIZE,
    checkpoint_files,
    newest_checkpoint,
    read_checkpoint,
    remove_checkpoints_before,
    write_checkpoint,
)

SEGMENTS = {0: b"segment zero " * 50, 3: bytes(range(256)) * 3, 7: b""}


class DirectorySyncs:
    """An fsync_directory that records the directories it was asked to sync (and really syncs them)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path: str) -> None:
        self.calls.append(path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write(directory, lsn: int, segments: dict[int, bytes] | None = None, **fields: int) -> str:
    """A checkpoint at `lsn` of `segments` (SEGMENTS by default); returns its path."""
    values = {"seq": lsn * 10, "root": (3 << 40) | 96, "next_segment": 8} | fields
    views = [(index, memoryview(data)) for index, data in (SEGMENTS if segments is None else segments).items()]
    return write_checkpoint(str(directory), lsn=lsn, segments=views, fsync_directory=DirectorySyncs(), **values)


def restored(header: checkpoint.Checkpoint) -> dict[int, bytes]:
    """The segments of a checkpoint, copied out the way recovery does."""
    buffers: dict[int, bytearray] = {}

    def make_segment(index: int, length: int) -> memoryview:
        buffers[index] = bytearray(length)
        return memoryview(buffers[index])

    header.restore(make_segment)
    return {index: bytes(buffer) for index, buffer in buffers.items()}


# --- writing and reading back --------------------------------------------


def test_a_checkpoint_reads_back_as_written(tmp_path):
    syncs = DirectorySyncs()
    views = [(index, memoryview(data)) for index, data in SEGMENTS.items()]
    progress: list[int] = []
    path = write_checkpoint(
        str(tmp_path),
        lsn=42,
        seq=40,
        root=12345,
        next_segment=8,
        segments=views,
        fsync_directory=syncs,
        progress=progress.append,
    )
    assert path == os.path.join(str(tmp_path), "checkpoint-000000000000002a.pb")
    assert os.listdir(tmp_path) == ["checkpoint-000000000000002a.pb"]  # no temporary left
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert syncs.calls == [str(tmp_path)]  # the rename is made durable
    assert progress == [650, 650 + 768, 650 + 768]  # bytes written so far, after each segment
    assert os.path.getsize(path) == HEADER_SIZE + 3 * 24 + 650 + 768

    header = read_checkpoint(path)
    assert (header.path, header.lsn, header.seq, header.root, header.next_segment) == (path, 42, 40, 12345, 8)
    assert header.segments == tuple((index, len(data), zlib.crc32(data)) for index, data in SEGMENTS.items())
    assert restored(header) == SEGMENTS


def test_segments_larger_than_a_chunk_are_copied_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "CHUNK", 7)  # every segment spans many chunks, the last one partial
    path = write(tmp_path, 1)
    assert restored(read_checkpoint(path)) == SEGMENTS


def test_a_failed_write_leaves_neither_the_checkpoint_nor_its_temporary(tmp_path):
    class DiskFull(Exception):
        pass

    def progress(written: int) -> None:
        assert os.listdir(tmp_path) == ["checkpoint-0000000000000005.tmp"]  # written aside first
        raise DiskFull

    views = [(index, memoryview(data)) for index, data in SEGMENTS.items()]
    with pytest.raises(DiskFull):
        write_checkpoint(
            str(tmp_path),
            lsn=5,
            seq=5,
            root=0,
            next_segment=1,
            segments=views,
            fsync_directory=DirectorySyncs(),
            progress=progress,
        )
    assert os.listdir(tmp_path) == []


# --- listing, newest, removal --------------------------------------------


def test_checkpoint_files_lists_published_checkpoints_oldest_first(tmp_path):
    paths = {lsn: write(tmp_path, lsn) for lsn in (300, 5, 0x1F)}
    (tmp_path / "checkpoint-0000000000000009.tmp").write_bytes(b"unfinished")
    (tmp_path / "checkpoint-notes.pb").write_text("not a checkpoint name")
    (tmp_path / "wal-0000000000000001.log").write_bytes(b"")
    assert checkpoint_files(str(tmp_path)) == [(5, paths[5]), (0x1F, paths[0x1F]), (300, paths[300])]


def test_newest_checkpoint_is_the_highest_lsn_and_removes_unfinished_ones(tmp_path):
    assert newest_checkpoint(str(tmp_path)) is None
    (tmp_path / "checkpoint-0000000000000063.tmp").write_bytes(b"a checkpoint that never finished")
    assert newest_checkpoint(str(tmp_path)) is None
    assert os.listdir(tmp_path) == []  # the leftover temporary is gone
    write(tmp_path, 7)
    newest = write(tmp_path, 12, {1: b"newer"}, seq=99)
    header = newest_checkpoint(str(tmp_path))
    assert header is not None and (header.path, header.lsn, header.seq) == (newest, 12, 99)
    assert restored(header) == {1: b"newer"}


def test_remove_checkpoints_before_keeps_the_one_at_lsn_and_later(tmp_path):
    for lsn in (1, 2, 3, 4):
        write(tmp_path, lsn)
    syncs = DirectorySyncs()
    assert remove_checkpoints_before(str(tmp_path), 3, syncs) == 2
    assert [lsn for lsn, _ in checkpoint_files(str(tmp_path))] == [3, 4]
    assert syncs.calls == [str(tmp_path)]
    assert remove_checkpoints_before(str(tmp_path), 3, syncs) == 0
    assert syncs.calls == [str(tmp_path)]  # nothing removed: no directory sync


# --- damage --------------------------------------------------------------


def patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write(data)


def test_a_truncated_header_is_corruption(tmp_path):
    path = write(tmp_path, 1)
    os.truncate(path, HEADER_SIZE - 1)
    with pytest.raises(CorruptionError, match=rf"^checkpoint {re.escape(path)} is truncated; run `protobase recover`$"):
        read_checkpoint(path)
    with pytest.raises(CorruptionError, match="is truncated"):
        newest_checkpoint(str(tmp_path))


def test_another_file_is_not_a_checkpoint(tmp_path):
    path = write(tmp_path, 1)
    patch(path, 0, b"PBWAL001")
    with pytest.raises(CorruptionError, match=rf"^{re.escape(path)} is not a ProtoBase checkpoint \(bad magic\)$"):
        read_checkpoint(path)


def test_another_format_version_names_both_versions(tmp_path):
    path = write(tmp_path, 1)
    patch(path, 8, struct.pack("<I", 2))
    message = f"checkpoint {path} has format version 2, this ProtoBase reads 1; open it with a matching release"
    with pytest.raises(CorruptionError, match=f"^{re.escape(message)}$"):
        read_checkpoint(path)


@pytest.mark.parametrize("offset", [24, 40, HEADER_SIZE + 10], ids=["lsn", "root", "segment table"])
def test_a_damaged_header_or_segment_table_fails_its_crc(tmp_path, offset):
    path = write(tmp_path, 1)
    with open(path, "rb") as file:
        file.seek(offset)
        byte = file.read(1)
    patch(path, offset, bytes([byte[0] ^ 0x01]))
    message = f"checkpoint {path} has a damaged header; run `protobase recover`"
    with pytest.raises(CorruptionError, match=f"^{re.escape(message)}$"):
        read_checkpoint(path)


def test_a_file_cut_inside_the_segment_table_is_a_damaged_header(tmp_path):
    path = write(tmp_path, 1)
    os.truncate(path, HEADER_SIZE + 30)  # the table holds three 24-byte entries
    with pytest.raises(CorruptionError, match="has a damaged header"):
        read_checkpoint(path)


def test_a_file_cut_inside_a_segment_fails_on_restore_naming_the_segment(tmp_path):
    path = write(tmp_path, 1)
    header = read_checkpoint(path)  # the header and table are intact: only restoring finds the loss
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(CorruptionError, match=rf"^checkpoint {re.escape(path)} is truncated inside segment 3$"):
        restored(header)


def test_damaged_segment_bytes_fail_their_checksum_on_restore(tmp_path):
    path = write(tmp_path, 1)
    header = read_checkpoint(path)
    patch(path, HEADER_SIZE + 3 * 24 + 5, b"X")  # inside segment 0
    message = f"checkpoint {path}: segment 0 fails its checksum; the file is damaged: run `protobase recover`"
    with pytest.raises(CorruptionError, match=f"^{re.escape(message)}$"):
        restored(header)
