"""Reclamation: copying compaction, and unlinking retired segments once nothing can reach them.

Owns when to compact, the segments a compaction retired and when they may go,
and what the coordinator knows of the readers that pin them. Runs in the
coordinator process, in its event loop (a compaction runs between two
commits, as part of the first).

Once the bytes appended since the last compaction exceed the live bytes then
(and `compact_min_bytes`), every atom reachable from the root is copied into
fresh segments and the copy becomes the latest root (commits.py publishes it
in order). The old segments are unlinked once the copy is published and no
reader's snapshot, nor a checkpoint being written (checkpoints.py), is older
than it. A compaction is all or nothing: one that fails (/dev/shm full)
unlinks its half-built copy and leaves the root, the generation and the
retired segments as they were. While a reader still pins the previous
compaction's segments, no automatic compaction starts (it could free
nothing). A reader that is alive but stopped is named by `oldest_reader`.

Invariant: a segment is unlinked only when no published root, no snapshot in
the reader table and no checkpoint in flight can reach it.
"""

from __future__ import annotations

import logging
import time

from protobase.coordinator.checkpoints import Checkpoints
from protobase.coordinator.commits import Commits
from protobase.coordinator.writer import Writer
from protobase.core.arena import ArenaWriter
from protobase.errors import ProtoBaseError
from protobase.shm.control import ControlBlock
from protobase.wire.counters import OldestReaderCounters

__all__ = ["Reclamation"]

log = logging.getLogger("protobase.coordinator")


class Reclamation:
    """Compactions, the segments they retired, and the readers that hold those back."""

    def __init__(
        self,
        arena: ArenaWriter,
        writer: Writer,
        control: ControlBlock,
        commits: Commits,
        checkpoints: Checkpoints,
        *,
        compact_min_bytes: int,
    ) -> None:
        self.arena = arena  # the data segments: copied into, released below a generation
        self.writer = writer  # copies the live atoms; its store caches atoms of released segments
        self.control = control  # the reader table: which snapshots are held
        self.commits = commits  # the root to copy, and where the copy becomes the latest root
        self.checkpoints = checkpoints  # requests in flight pin their seq's segments like readers
        self.compact_min_bytes = compact_min_bytes  # garbage below which no automatic compaction runs
        self.live_after_compaction = arena.allocated_bytes  # bytes copied by the last compaction
        self.allocated_at_compaction = arena.allocated_bytes  # arena.allocated_bytes right after it
        self.discarded_at_compaction = 0  # writer.discarded_bytes right after it
        self.next_compaction_attempt = 0  # arena.allocated_bytes before which no automatic compaction is tried
        self.retired: list[tuple[int, int]] = []  # [(publish seq, first live segment)] awaiting unlink
        # {reader slot -> (pid, snapshot seq, time.monotonic() we first saw it hold that snapshot)}
        self.pins_seen: dict[int, tuple[int, int, float]] = {}
        self.compactions = 0  # compactions done since start
        self.compaction_failures = 0  # compactions undone (/dev/shm full, ...) since start

    def maybe_compact(self) -> None:
        """Compact once the garbage outweighs the live data. Never fails the commit that called it.

        Not while the previous compaction's segments still wait for a reader to
        let go: another copy could not free them either, it would only add one
        more generation for that reader to pin (a stopped reader made memory
        grow with every compaction). After a failed compaction, wait for as
        many bytes again before the next attempt.
        """
        threshold = max(self.live_after_compaction, self.compact_min_bytes)
        allocated = self.arena.allocated_bytes
        if allocated - self.allocated_at_compaction <= threshold or allocated < self.next_compaction_attempt:
            return
        if self.retired:
            # The readers may have let go since: do not wait for the housekeeping tick, or
            # commits fast enough to outrun it pile up garbage past every bound.
            self.release_retired()
            if self.retired:
                return
        try:
            self.compact()
        except Exception as error:  # the commit is applied and queued: its client gets "ok", whatever happens here
            self.next_compaction_attempt = allocated + threshold
            log.error(
                "compaction failed and was undone; serving the uncompacted data, next attempt after %d more bytes: %s",
                threshold,
                error,
                exc_info=not isinstance(error, ProtoBaseError),
            )

    def compact(self) -> None:
        """Copy the live data into fresh segments and publish it; old segments go once unpinned.

        All or nothing: if the copy fails (/dev/shm full, or any error), its
        segments are unlinked and the root, the generation and the retired
        segments stay as they were; the error is raised, as ProtoBaseError
        saying so when it is one.
        """
        started = time.monotonic()
        before = self.arena.allocated_bytes
        first_new = self.arena.start_generation(self.live_bytes() + self.live_bytes() // 16)
        try:
            root = self.writer.copy_root(self.commits.root)
        except BaseException as error:
            self.compaction_failures += 1
            self.arena.abandon_generation()
            self.writer.store.clear()  # it caches nodes of the abandoned copy
            if isinstance(error, ProtoBaseError):
                raise ProtoBaseError(f"compaction failed and was undone, the database is unchanged: {error}") from error
            raise
        seq = self.commits.replace_root(root)
        self.live_after_compaction = self.arena.allocated_bytes - before
        self.allocated_at_compaction = self.arena.allocated_bytes
        self.discarded_at_compaction = self.writer.discarded_bytes
        self.retired.append((seq, first_new))
        self.writer.store.clear()
        self.compactions += 1
        log.info(
            "compaction %d copied %d live bytes in %.3fs",
            self.compactions,
            self.live_after_compaction,
            time.monotonic() - started,
        )
        self.release_retired()

    def release_retired(self) -> None:
        """Unlink the retired segments no published root, reader or checkpoint in flight can reach."""
        if not self.retired:
            return
        oldest = self.control.oldest_snapshot()
        for pin in self.checkpoints.pinned_seqs():
            oldest = pin if oldest is None else min(oldest, pin)
        while self.retired:
            seq, first_live = self.retired[0]
            if self.commits.published_seq < seq or (oldest is not None and oldest < seq):
                return
            self.retired.pop(0)
            self.writer.store.reader.forget_below(first_live)
            self.arena.release_below(first_live)
            self.control.oldest_segment = first_live

    def observe_pins(self) -> None:
        """Note when each reader was first seen holding its current snapshot (to within a tick)."""
        now = time.monotonic()
        seen = {}
        for reader in self.control.readers():
            if reader.snapshot_seq is None:
                continue
            before = self.pins_seen.get(reader.slot)
            unchanged = before is not None and before[:2] == (reader.pid, reader.snapshot_seq)
            seen[reader.slot] = before if unchanged and before is not None else (reader.pid, reader.snapshot_seq, now)
        self.pins_seen = seen

    def oldest_reader(self) -> OldestReaderCounters | None:
        """The reader holding the oldest snapshot: slot, pid, seq, seconds held, retired bytes it keeps alive.

        What pins memory when a reader stops (SIGSTOP, a debugger, a hung
        worker): it is alive, so it is not reaped, and every segment retired
        after its snapshot waits for it. None when no reader holds a snapshot.
        """
        self.observe_pins()
        if not self.pins_seen:
            return None
        slot, (pid, seq, since) = min(self.pins_seen.items(), key=lambda item: item[1][1])
        kept_below = max((first_live for retired_seq, first_live in self.retired if retired_seq > seq), default=0)
        return {
            "slot": slot,
            "pid": pid,
            "snapshot_seq": seq,
            "held_seconds": time.monotonic() - since,
            "retained_bytes": self.arena.bytes_below(kept_below),
        }

    def live_bytes(self) -> int:
        """Estimated bytes reachable from the root (exact right after a compaction)."""
        appended = self.arena.allocated_bytes - self.allocated_at_compaction
        discarded = self.writer.discarded_bytes - self.discarded_at_compaction
        return self.live_after_compaction + appended - discarded
