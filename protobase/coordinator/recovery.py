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

`salvage` is that command's side: it runs in the command's own process, with
shared memory of its own (unlinked when it returns), reads the damaged
directory without changing it, and writes what is intact into a new one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from protobase.coordinator.writer import Writer
from protobase.core import codec
from protobase.core.arena import ArenaWriter, AtomReader
from protobase.core.datadir import STAMP, DataDir, FileLock
from protobase.core.store import Store
from protobase.errors import CorruptionError, DataDirectoryError, PathError
from protobase.persistence import wal
from protobase.persistence.checkpoint import (
    Checkpoint,
    checkpoint_files,
    newest_checkpoint,
    read_checkpoint,
    write_checkpoint,
)
from protobase.shm import names

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


_REPLAY_ERRORS = (PathError, CorruptionError, ValueError, TypeError)  # what a record that cannot apply raises


def _apply_record(writer: Writer, root: Any, payload: bytes) -> tuple[int, Any]:
    """Apply one WAL record's operations to `root`: (its commit's seq, the new root).

    Raises one of _REPLAY_ERRORS for a record that cannot be applied; `root`
    itself is never changed (path copying), so the caller may go on without it.
    """
    record_seq, ops_bytes = codec.decode(payload, frozen=False)
    ops = codec.decode(ops_bytes, frozen=False, opaque_dataclasses=True)
    return record_seq, writer.apply_all(root, [(code, tuple(path), argument) for code, path, argument in ops])


def replay(
    records: Iterator[tuple[int, bytes]], writer: Writer, root: Any, seq: int, lsn: int
) -> tuple[int, int, int, int]:
    """Apply WAL records in order; return (seq, root pointer, last lsn, records applied).

    Records must follow `lsn` without a gap, and each must apply: anything
    else is CorruptionError.
    """
    applied = 0
    for record_lsn, payload in records:
        if record_lsn != lsn + 1:
            raise CorruptionError(f"the WAL jumps from LSN {lsn} to {record_lsn}: a WAL file is missing")
        try:
            seq, root = _apply_record(writer, root, payload)
        except _REPLAY_ERRORS as error:
            raise CorruptionError(f"WAL record {record_lsn} cannot be replayed: {error}") from error
        lsn = record_lsn
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
        log.warning(
            "recovered %s: checkpoint at LSN %d, %d WAL records replayed, seq %d, in %.3fs",
            directory,
            checkpoint_lsn,
            replayed,
            seq,
            recovered.seconds,
        )
    return recovered


MISSING = "damaged or missing"  # why a salvage skips an LSN that no intact WAL record holds


@dataclass(frozen=True)
class SalvageReport:
    """What `salvage` kept and what it had to leave behind."""

    destination: str
    checkpoint: str | None  # the checkpoint it started from, if one was intact
    damaged_checkpoints: tuple[str, ...]
    records_applied: int
    # (first lsn, last lsn, why) of every LSN range not applied, in order: no intact record
    # holds it (MISSING), or its record could not be applied. Without past_gaps, only the
    # first: the salvage stopped there.
    records_skipped: tuple[tuple[int, int, str], ...]
    records_left: int  # intact records after the first lost one, not applied (without past_gaps)
    damaged_ranges: tuple[tuple[str, int, int], ...]  # (WAL file, start, end) of unreadable bytes
    last_lsn: int
    seq: int
    past_gaps: bool  # whether records after a lost one were applied


def salvage(
    source: str, destination: str, progress: Callable[[str], None] = lambda line: None, *, past_gaps: bool = False
) -> SalvageReport:
    """Rebuild the intact commits of `source` into the new data directory `destination`.

    Reads only: `source` is never changed. Starts from the newest intact
    checkpoint (falling back to older ones), then applies the WAL records that
    validate, in LSN order, skipping damaged bytes. By default it stops at the
    first LSN it cannot apply (a record damaged, missing, or not applicable):
    a later commit may depend on the lost one, so the result is the state
    after the last commit before it, a state that really was. With
    `past_gaps`, it applies every intact record after a lost one too, and
    reports every LSN it skipped. The result is written to `destination` as a
    checkpoint.
    """
    source_dir = _unserved_directory(source)
    target = DataDir.open(destination)
    if any(name != STAMP for name in os.listdir(target.path)):
        raise DataDirectoryError(f"{target.path} is not empty; salvage into a new directory")
    damaged: list[str] = []
    arena, writer, used, checkpoint = _restore_newest_intact_checkpoint(source_dir.path, damaged, progress)
    try:
        seq, root, lsn = (checkpoint.seq, checkpoint.root, checkpoint.lsn) if checkpoint is not None else (0, 0, 0)
        records, known_end, ranges = _intact_records(source_dir.path, lsn, progress)
        seq, root, lsn, applied, skipped, left = _apply_in_order(records, known_end, writer, root, seq, lsn, past_gaps)
        write_checkpoint(
            target.path,
            lsn=lsn,
            seq=seq,
            root=root,
            next_segment=arena.next_index,
            segments=[(index, arena.segments[index].buf[:length]) for index, length in arena.generation()],
            fsync_directory=wal.fsync_directory,
        )
        lost = sum(last - first + 1 for first, last, _ in skipped)
        progress(f"wrote {target.path}: seq {seq}, LSN {lsn}, {applied} records applied, {lost} skipped")
    finally:
        arena.close(unlink=True)
    return SalvageReport(
        target.path, used, tuple(damaged), applied, tuple(skipped), left, tuple(ranges), lsn, seq, past_gaps
    )


def _unserved_directory(source: str) -> DataDir:
    """The data directory `source`, checked to have no coordinator, its crashed instance swept from /dev/shm."""
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
    return source_dir


def _new_arena() -> tuple[ArenaWriter, Writer]:
    """Fresh shared memory of its own for a salvage, and a Writer on it."""
    arena = ArenaWriter(names.new_instance_id())
    return arena, Writer(arena, Store(AtomReader(arena.instance_id, writer=arena)))


def _restore_newest_intact_checkpoint(
    directory: str, damaged: list[str], progress: Callable[[str], None]
) -> tuple[ArenaWriter, Writer, str | None, Checkpoint | None]:
    """(arena, writer, path, checkpoint) of the newest checkpoint of `directory` that restores whole.

    Appends the path of each damaged one it skipped to `damaged`; path and
    checkpoint are None when none is intact (the arena is then empty). The
    caller closes the arena, which is closed here only if this raises.
    """
    arena, writer = _new_arena()
    try:
        for _, path in reversed(checkpoint_files(directory)):
            try:
                checkpoint = read_checkpoint(path)
                restore_checkpoint(checkpoint, arena)
            except CorruptionError as error:
                damaged.append(path)
                progress(f"skipping damaged checkpoint: {error}")
                arena.close(unlink=True)
                arena, writer = _new_arena()
                continue
            progress(f"checkpoint {path}: seq {checkpoint.seq}, LSN {checkpoint.lsn}")
            return arena, writer, path, checkpoint
    except BaseException:
        arena.close(unlink=True)
        raise
    return arena, writer, None, None


def _intact_records(
    directory: str, after_lsn: int, progress: Callable[[str], None]
) -> tuple[list[tuple[int, bytes]], int, list[tuple[str, int, int]]]:
    """The intact WAL records of `directory` after `after_lsn`, sorted by LSN; the last LSN the WAL
    proves was written; and the (file, start, end) of every unreadable byte range."""
    records: list[tuple[int, bytes]] = []
    ranges: list[tuple[str, int, int]] = []
    known_end = after_lsn
    for first_lsn, path in wal.list_wal_files(directory):
        found, bad = wal.salvage_records(path)
        ranges.extend((path, start, end) for start, end in bad)
        records.extend((record.lsn, record.payload) for record in found if record.lsn > after_lsn)
        known_end = max([known_end, first_lsn - 1, *(record.lsn for record in found)])
        progress(f"{path}: {len(found)} intact records, {len(bad)} damaged ranges")
    records.sort(key=lambda record: record[0])
    return records, known_end, ranges


def _apply_in_order(
    records: list[tuple[int, bytes]], known_end: int, writer: Writer, root: Any, seq: int, lsn: int, past_gaps: bool
) -> tuple[int, int, int, int, list[tuple[int, int, str]], int]:
    """Apply salvaged records after `lsn`; (seq, root pointer, last lsn, applied, skipped ranges, records left).

    `records` are the intact records, sorted by LSN; LSNs up to `known_end`
    that none of them holds were written once and are lost. Without
    `past_gaps` the first LSN lost (or whose record does not apply) ends the
    salvage, and the intact records after it are counted as left.
    """
    skipped: list[tuple[int, int, str]] = []
    applied = 0
    expected = lsn + 1
    for index, (record_lsn, payload) in enumerate(records):
        if record_lsn < expected:
            continue  # a second copy of a record already applied
        if record_lsn > expected:
            skipped.append((expected, record_lsn - 1, MISSING))
            if not past_gaps:
                return seq, writer.flush(root), lsn, applied, skipped, len(records) - index
        expected = record_lsn + 1
        try:
            record_seq, working = _apply_record(writer, root, payload)
        except _REPLAY_ERRORS as error:
            skipped.append((record_lsn, record_lsn, f"cannot be applied: {error}"))
            if not past_gaps:
                return seq, writer.flush(root), lsn, applied, skipped, len(records) - index - 1
            continue
        seq, root, lsn = record_seq, working, record_lsn
        applied += 1
        if applied % FLUSH_EVERY == 0:
            root = writer.flush(root)
    if known_end >= expected:
        skipped.append((expected, known_end, MISSING))
    return seq, writer.flush(root), lsn, applied, skipped, 0
