"""Recovery: rebuild the state of a data directory from its checkpoint and WAL.

Owns the order of recovery. Run by a starting coordinator, after it holds
`coordinator.lock` and `wal.lock` (so no persistence process is still writing):

1. load the newest checkpoint: its segments are copied into new shared memory
   under their old indexes, so every pointer in them is valid again;
2. replay, in LSN order, every WAL record after the checkpoint's LSN through
   the same Writer that applies live commits (replay is logical: a record is
   the commit's operations);
3. the result is the state after the last complete commit. A torn tail ends
   the replay (the persistence process cuts it off when it reopens the file);
   corruption followed by valid records raises CorruptionError naming the
   file and offset, and so does a gap in the LSNs (between the checkpoint and
   the WAL, or between two WAL files: a checkpoint or WAL file moved away).
   `protobase recover` salvages what is intact.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .. import codec, wal
from ..arena import ArenaWriter
from ..checkpoint import Checkpoint, newest_checkpoint
from ..errors import CorruptionError, DataDirectoryError
from .writer import PathError, Writer

__all__ = ["Recovered", "SalvageReport", "recover", "replay", "restore_checkpoint", "salvage"]

log = logging.getLogger("protobase.coordinator")

FLUSH_EVERY = 2000  # records replayed between flushes, which bounds the dirty working set


@dataclass(frozen=True)
class Recovered:
    """What recovery rebuilt."""

    seq: int  # sequence number of the last commit
    root: int  # its root pointer
    lsn: int  # LSN of the last commit (0: none ever)
    checkpoint_lsn: int  # LSN the loaded checkpoint covered (0: none)
    replayed: int  # WAL records replayed
    seconds: float


def restore_checkpoint(checkpoint: Checkpoint, arena: ArenaWriter) -> None:
    """Copy a checkpoint's segments into shared memory under their own indexes."""
    checkpoint.restore(arena.restore_segment)
    arena.next_index = max(arena.next_index, checkpoint.next_segment)
    arena.generation_start = min((index for index, _, _ in checkpoint.segments), default=arena.next_index)


def replay(records: Iterator[tuple[int, bytes]], writer: Writer, root: Any, seq: int, lsn: int,
           on_error: Callable[[int, Exception], None] | None = None) -> tuple[int, int, int, int]:
    """Apply WAL records in order; return (seq, root pointer, last lsn, records applied).

    Records must follow `lsn` without a gap. `on_error(lsn, error)`, when given,
    skips a record that cannot be applied (salvage); otherwise it is corruption.
    """
    applied = 0
    for record_lsn, payload in records:
        if on_error is None and record_lsn != lsn + 1:
            raise CorruptionError(f"the WAL jumps from LSN {lsn} to {record_lsn}: a WAL file is missing")
        try:
            record_seq, ops_bytes = codec.decode(payload, frozen=False)
            working = root
            for code, path, argument in codec.decode(ops_bytes, frozen=False, opaque_dataclasses=True):
                working = writer.apply(working, code, tuple(path), argument)
        except (PathError, CorruptionError, ValueError, TypeError) as error:
            if on_error is None:
                raise CorruptionError(f"WAL record {record_lsn} cannot be replayed: {error}") from error
            on_error(record_lsn, error)
            continue
        root, seq, lsn = working, record_seq, record_lsn
        applied += 1
        if applied % FLUSH_EVERY == 0:
            root = writer.flush(root)
    return seq, writer.flush(root), lsn, applied


def recover(directory: str, arena: ArenaWriter, writer: Writer) -> Recovered:
    """Rebuild the newest state of `directory` into `arena`.

    The WAL must continue the checkpoint without a gap, and its files each
    other (`wal.read_directory`): a missing record raises CorruptionError
    naming the LSNs, the files and the remedy, since replaying the commits
    after it onto a state without it would build a state that never was.
    """
    started = time.monotonic()
    checkpoint = newest_checkpoint(directory)
    seq = root = lsn = 0
    origin = "an empty database (there is no checkpoint)"
    if checkpoint is not None:
        restore_checkpoint(checkpoint, arena)
        seq, root, lsn = checkpoint.seq, checkpoint.root, checkpoint.lsn
        origin = f"checkpoint {checkpoint.path} (lsn {lsn})"
    checkpoint_lsn = lsn
    seq, root, lsn, replayed = replay(wal.read_directory(directory, lsn, origin=origin), writer, root, seq, lsn)
    recovered = Recovered(seq, root, lsn, checkpoint_lsn, replayed, time.monotonic() - started)
    if checkpoint is not None or replayed:
        log.warning("recovered %s: checkpoint at LSN %d, %d WAL records replayed, seq %d, in %.3fs",
                    directory, checkpoint_lsn, replayed, seq, recovered.seconds)
    return recovered


@dataclass(frozen=True)
class SalvageReport:
    """What `salvage` kept and what it had to leave behind."""

    destination: str
    checkpoint: str | None  # the checkpoint it started from, if one was intact
    damaged_checkpoints: tuple[str, ...]
    records_applied: int
    records_skipped: tuple[tuple[int, str], ...]  # (lsn, why) of records that could not be applied
    damaged_ranges: tuple[tuple[str, int, int], ...]  # (WAL file, start, end) of unreadable bytes
    last_lsn: int
    seq: int


def salvage(source: str, destination: str, progress: Callable[[str], None] = lambda line: None) -> SalvageReport:
    """Rebuild every intact commit of `source` into the new data directory `destination`.

    Reads only: `source` is never changed. Starts from the newest intact
    checkpoint (falling back to older ones), applies every WAL record that
    validates, in LSN order, skipping damaged bytes and records that no longer
    apply, and writes the result to `destination` as a checkpoint.
    """
    from ..arena import ArenaWriter, AtomReader
    from ..checkpoint import checkpoint_files, read_checkpoint, write_checkpoint
    from ..datadir import DataDir, FileLock
    from ..shm import names
    from ..store import Store

    source_dir = DataDir.open(source, create=False)
    lock = FileLock(source_dir.file("coordinator.lock"))
    if not lock.acquire(blocking=False):
        raise DataDirectoryError(f"a coordinator is serving {source_dir.path}; stop it before recovering")
    try:
        previous = source_dir.read_instance()
        if previous and names.is_instance_id(previous):
            names.sweep(previous)  # what the crashed coordinator left in /dev/shm
    finally:
        lock.release()
    target = DataDir.open(destination)
    if any(name != "PROTOBASE" for name in os.listdir(target.path)):
        raise DataDirectoryError(f"{target.path} is not empty; salvage into a new directory")
    arena = ArenaWriter(names.new_instance_id())
    writer = Writer(arena, Store(AtomReader(arena.instance_id, writer=arena)))
    damaged: list[str] = []
    skipped: list[tuple[int, str]] = []
    ranges: list[tuple[str, int, int]] = []
    used = None
    seq = root = lsn = 0
    try:
        for _, path in reversed(checkpoint_files(source_dir.path)):
            try:
                checkpoint = read_checkpoint(path)
                restore_checkpoint(checkpoint, arena)
            except CorruptionError as error:
                damaged.append(path)
                progress(f"skipping damaged checkpoint: {error}")
                arena.close(unlink=True)
                arena = ArenaWriter(names.new_instance_id())
                writer = Writer(arena, Store(AtomReader(arena.instance_id, writer=arena)))
                continue
            used, seq, root, lsn = path, checkpoint.seq, checkpoint.root, checkpoint.lsn
            progress(f"checkpoint {path}: seq {seq}, LSN {lsn}")
            break
        records = []
        for _, path in wal.list_wal_files(source_dir.path):
            found, bad = wal.salvage_records(path)
            ranges.extend((path, start, end) for start, end in bad)
            records.extend((record.lsn, record.payload) for record in found if record.lsn > lsn)
            progress(f"{path}: {len(found)} intact records, {len(bad)} damaged ranges")
        records.sort(key=lambda record: record[0])
        seq, root, lsn, applied = replay(iter(records), writer, root, seq, lsn,
                                         on_error=lambda bad_lsn, error: skipped.append((bad_lsn, str(error))))
        write_checkpoint(target.path, lsn=lsn, seq=seq, root=root, next_segment=arena.next_index,
                         segments=[(index, arena.segments[index].buf[:length])
                                   for index, length in arena.generation()],
                         fsync_directory=wal.fsync_directory)
        progress(f"wrote {target.path}: seq {seq}, LSN {lsn}, {applied} records applied, {len(skipped)} skipped")
    finally:
        arena.close(unlink=True)
    return SalvageReport(target.path, used, tuple(damaged), applied, tuple(skipped), tuple(ranges), lsn, seq)
