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
   file and offset, and `protobase recover` salvages what is intact.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .. import codec, wal
from ..arena import ArenaWriter
from ..checkpoint import Checkpoint, newest_checkpoint
from ..errors import CorruptionError
from .writer import PathError, Writer

__all__ = ["Recovered", "recover", "replay", "restore_checkpoint"]

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
            for code, path, argument in codec.decode(ops_bytes, frozen=False):
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


def wal_records(directory: str, after_lsn: int) -> Iterator[tuple[int, bytes]]:
    """Every valid WAL record after `after_lsn`, across files, strictly checked."""
    for _, path in wal.list_wal_files(directory):
        yield from wal.read_records(path, after_lsn, strict=True)


def recover(directory: str, arena: ArenaWriter, writer: Writer) -> Recovered:
    """Rebuild the newest state of `directory` into `arena`."""
    started = time.monotonic()
    checkpoint = newest_checkpoint(directory)
    seq = root = lsn = 0
    if checkpoint is not None:
        restore_checkpoint(checkpoint, arena)
        seq, root, lsn = checkpoint.seq, checkpoint.root, checkpoint.lsn
    checkpoint_lsn = lsn
    seq, root, lsn, replayed = replay(wal_records(directory, lsn), writer, root, seq, lsn)
    recovered = Recovered(seq, root, lsn, checkpoint_lsn, replayed, time.monotonic() - started)
    if checkpoint is not None or replayed:
        log.warning("recovered %s: checkpoint at LSN %d, %d WAL records replayed, seq %d, in %.3fs",
                    directory, checkpoint_lsn, replayed, seq, recovered.seconds)
    return recovered
