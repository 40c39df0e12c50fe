"""Reclamation: copying compaction, and unlinking retired segments once nothing can reach them.

Owns when to compact, the compaction under way, the segments a compaction
retired and when they may go, and what the coordinator knows of the readers
that pin them. Runs in the coordinator process, in its event loop.

Once the bytes appended since the last compaction exceed the live bytes then
(and `compact_min_bytes`), every atom reachable from the root is copied into
fresh segments and the copy becomes the latest root (commits.py publishes it
in order). A small database (up to `compact_in_steps_above` live bytes) is
copied at once, between two commits. A larger one is copied in steps of at
most COMPACTION_STEP_SECONDS between commits (`advance`, called by the loop):
the copy is of the root the compaction started from, so the commits made
meanwhile are recorded (commits.py) and replayed onto it, and the step that
replays the last of them publishes it. Until then the generation keeps its
start, so a checkpoint copies everything the latest root reaches.

The old segments are unlinked once the copy is published and no reader's
snapshot, nor a checkpoint being written (checkpoints.py), is older than it.
A compaction that fails (/dev/shm full) changes no data: at once, its
half-built copy is unlinked and the root, the generation and the retired
segments stay as they were; in steps, the copy is dropped (its atoms share
segments with the commits made meanwhile, so they wait for the next
compaction). While a reader still pins the previous compaction's segments,
no automatic compaction starts (it could free nothing). A reader that is
alive but stopped is named by `oldest_reader`.

Invariant: a segment is unlinked only when no published root, no snapshot in
the reader table and no checkpoint in flight can reach it; the latest root
never points into a copy that is not finished.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from protobase.coordinator.checkpoints import Checkpoints
from protobase.coordinator.commits import Commits, parse_ops
from protobase.coordinator.writer import Writer
from protobase.core.arena import ArenaWriter
from protobase.errors import ProtoBaseError
from protobase.settings import DEFAULTS
from protobase.shm.control import ControlBlock
from protobase.wire.counters import OldestReaderCounters

__all__ = ["Reclamation", "COMPACTION_STEP_SECONDS"]

log = logging.getLogger("protobase.coordinator")

COMPACTION_STEP_SECONDS = 0.002  # the longest one step of a compaction holds the event loop
STEPS_BETWEEN_CLOCK_READS = 8  # tree nodes copied between two looks at the clock
# The share of a catching-up step that replays commits; writing the nodes they changed takes the rest
# (replaying until the step's end, then writing, made steps of up to 11.6 ms).
REPLAY_SHARE = 1 / 3


@dataclass
class _Running:
    """An automatic compaction under way: a copy of the root it started from, then the commits since."""

    steps: Generator[None, None, int] | None  # the copy being made; None once whole
    first_new: int  # the first segment it wrote: everything before goes once the copy is published
    started: float  # time.monotonic() when it started
    copy: int = 0  # the copy's root once whole, then with the commits since replayed onto it
    written: int = 0  # bytes its steps appended: the live bytes, once it is published
    next_step_at: float = 0.0  # time.monotonic() before which the loop serves commits only
    backlog: int | None = None  # commits left to replay after the last catching-up step


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
        compact_in_steps_above: int = DEFAULTS.compact_in_steps_above,
    ) -> None:
        self.arena = arena  # the data segments: copied into, released below a generation
        self.writer = writer  # copies the live atoms; its store caches atoms of released segments
        self.control = control  # the reader table: which snapshots are held
        self.commits = commits  # the root to copy, and where the copy becomes the latest root
        self.checkpoints = checkpoints  # requests in flight pin their seq's segments like readers
        self.compact_min_bytes = compact_min_bytes  # garbage below which no automatic compaction runs
        self.compact_in_steps_above = compact_in_steps_above  # live bytes above which it copies in steps
        self.live_after_compaction = arena.allocated_bytes  # bytes copied by the last compaction
        self.allocated_at_compaction = arena.allocated_bytes  # arena.allocated_bytes right after it
        self.discarded_at_compaction = 0  # writer.discarded_bytes right after it
        self.next_compaction_attempt = 0  # arena.allocated_bytes before which no automatic compaction is tried
        self.retired: list[tuple[int, int]] = []  # [(publish seq, first live segment)] awaiting unlink
        # {reader slot -> (pid, snapshot seq, time.monotonic() we first saw it hold that snapshot)}
        self.pins_seen: dict[int, tuple[int, int, float]] = {}
        self.compactions = 0  # compactions done since start
        self.running: _Running | None = None  # the automatic compaction under way, made in steps
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
        if self.running is not None:
            return
        if self.live_bytes() > self.compact_in_steps_above:
            self.start_compaction()
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

    # -- a compaction in steps ---------------------------------------------------------

    def start_compaction(self) -> None:
        """Begin a compaction made in steps between commits (`advance`)."""
        first_new = self.arena.open_next_generation()  # no size: one segment for all would be one long fallocate
        self.commits.recording = []
        self.running = _Running(self.writer.copy_steps(self.commits.root), first_new, time.monotonic())

    def due_in(self) -> float | None:
        """Seconds until the running compaction's next step is due (0: now); None when none runs."""
        if self.running is None:
            return None
        return max(0.0, self.running.next_step_at - time.monotonic())

    def advance(self) -> None:
        """Take the running compaction's next step if it is due: at most COMPACTION_STEP_SECONDS of work.

        A step copies nodes, or once the copy is whole replays onto it the
        commits made since it started; the step that replays the last of
        them makes the copy the latest root. Steps leave the event loop at
        least as much time again for commits, so a commit waits one step at
        most and the copy still catches up (replaying a commit costs less
        than serving it). A failure leaves the data as it is (see `_abandon`).
        """
        running = self.running
        if running is None or time.monotonic() < running.next_step_at:
            return
        began, allocated = time.monotonic(), self.arena.allocated_bytes
        deadline = began + COMPACTION_STEP_SECONDS
        copying = running.steps is not None
        try:
            if copying:
                self._copy_until(running, deadline)
            if running.steps is None:
                self._catch_up_until(running, began + COMPACTION_STEP_SECONDS * REPLAY_SHARE)
        except Exception as error:
            self._abandon(error)
            return
        running.written += self.arena.allocated_bytes - allocated
        if self.running is running:
            # Commits get as much time again while the copy is made, half as much while it catches up:
            # replaying a commit costs at most what serving it did, so the backlog shrinks.
            took = time.monotonic() - began
            running.next_step_at = time.monotonic() + (took if copying else took / 2)

    def _copy_until(self, running: _Running, deadline: float) -> None:
        steps = running.steps
        assert steps is not None, "the copy is under way"
        try:
            while True:
                for _ in range(STEPS_BETWEEN_CLOCK_READS):
                    next(steps)
                if time.monotonic() >= deadline:
                    return
        except StopIteration as done:
            running.copy, running.steps = done.value, None

    def _catch_up_until(self, running: _Running, deadline: float) -> None:
        """Replay the commits made since the copy started onto it; once none is left, publish it."""
        made = self.commits.recording
        assert made is not None, "commits are recorded while a compaction runs"
        # At least the commits recorded since the last step, and one more: the backlog shrinks every step.
        at_least = 1 if running.backlog is None else len(made) - running.backlog + 1
        replayed = 0
        root: Any = running.copy
        while replayed < len(made) and (replayed < at_least or time.monotonic() < deadline):
            ops = parse_ops(made[replayed], self.writer.records)
            root = self.writer.apply_all(root, [(code, tuple(path), argument) for code, path, argument in ops])
            replayed += 1
        if replayed:
            running.copy = self.writer.flush(root)
            del made[:replayed]
        running.backlog = len(made)
        if not made:
            self._finish(running)

    def _finish(self, running: _Running) -> None:
        """The copy holds what the latest root holds: make it the latest root, retire the old segments."""
        self.commits.recording = None
        self.running = None
        seq = self.commits.replace_root(running.copy)
        self.arena.move_generation_start(running.first_new)
        self._compacted(seq, running.first_new, running.written, running.started)

    def _abandon(self, error: Exception) -> None:
        """A step failed (/dev/shm full, or any error): leave the data as it is and retry later.

        The latest root never pointed into the copy, so nothing is lost; the
        copy's atoms are garbage in the segments the commits made meanwhile
        also use, and the next compaction reclaims them.
        """
        self._drop_running()
        self.compaction_failures += 1
        threshold = max(self.live_after_compaction, self.compact_min_bytes)
        self.next_compaction_attempt = self.arena.allocated_bytes + threshold
        log.error(
            "compaction failed and was abandoned; serving the uncompacted data, next attempt after %d more bytes: %s",
            threshold,
            error,
            exc_info=not isinstance(error, ProtoBaseError),
        )

    def _drop_running(self) -> None:
        """Forget the compaction in steps under way, if any: its copy is garbage."""
        if self.running is not None:
            self.commits.recording = None
            self.running = None
            self.writer.store.clear()  # it caches nodes of the copy

    # -- a compaction at once ------------------------------------------------------------

    def compact(self) -> None:
        """Copy the live data into fresh segments and publish it, at once; old segments go once unpinned.

        For an explicit request (`db.compact()`); a compaction in steps under
        way is dropped, since this one copies the latest root whole. All or
        nothing: if the copy fails (/dev/shm full, or any error), its segments
        are unlinked and the root, the generation and the retired segments
        stay as they were; the error is raised, as ProtoBaseError saying so
        when it is one.
        """
        self._drop_running()
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
        self._compacted(self.commits.replace_root(root), first_new, self.arena.allocated_bytes - before, started)

    def _compacted(self, seq: int, first_new: int, copied: int, started: float) -> None:
        """A copy of `copied` bytes became the root of `seq`: account for it, retire what came before `first_new`."""
        self.live_after_compaction = copied
        self.allocated_at_compaction = self.arena.allocated_bytes
        self.discarded_at_compaction = self.writer.discarded_bytes
        self.retired.append((seq, first_new))
        # The bytes cache's views would keep the old segments mapped; the decoded nodes of them age out
        # of the object cache (pointers are never reused), cheaper than freeing them all now (100+ ms).
        self.writer.store.bytes.clear()
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
