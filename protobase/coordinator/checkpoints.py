"""Checkpoints and backups the coordinator asks of the persistence process.

Owns the requests in flight, in the order they went into the commit ring, and
when to ask for one. Runs in the coordinator process, in its event loop. The
persistence process writes them (persistence/checkpoint.py) from the shared
memory segments of the state after the last commit, and reports each one
done, naming the request's id (in ring order, but a request sent again to a
restarted persistence process may come back later than those after it).

A checkpoint is asked for each time the WAL grew by `checkpoint_bytes` since
the last (and on a clean stop, server.py), at most one at a time; it lets the
persistence process drop the WAL before it. A backup is a checkpoint written
into a new, empty data directory; the WAL is left alone, and whoever asked is
answered once it is on disk.

Invariant: while a request is in flight, the segments of the seq it copies
stay alive: `pinned_seqs` holds them back from reclamation (reclamation.py),
like a reader's snapshot.
"""

from __future__ import annotations

import os

from protobase.coordinator.clients import Asker, Connections
from protobase.coordinator.commits import Commits
from protobase.coordinator.durability import Durability
from protobase.core.arena import ArenaWriter, segment_of
from protobase.core.datadir import STAMP, DataDir
from protobase.errors import CoordinatorError, DataDirectoryError

__all__ = ["Checkpoints"]


class Checkpoints:
    """The checkpoint and backup requests in flight, and when to ask for the next checkpoint."""

    def __init__(
        self,
        durability: Durability,
        arena: ArenaWriter,
        commits: Commits,
        connections: Connections,
        *,
        checkpoint_bytes: int,
        changed: bool,
    ) -> None:
        self.durability = durability  # carries the requests to the persistence process, counts the WAL bytes
        self.arena = arena  # the segments a checkpoint copies
        self.commits = commits  # the latest commit, which a checkpoint holds
        self.connections = connections  # to answer backups
        self.checkpoint_bytes = checkpoint_bytes  # WAL bytes that trigger a checkpoint
        # Checkpoints (and backups) asked of the persistence process, in ring order:
        # {request id: (seq it pins, asker to answer or None)}; their segments must stay alive.
        self.requests: dict[int, tuple[int, Asker | None]] = {}
        self.changed_since_checkpoint = changed  # a commit since the last checkpoint (or replayed at start)
        self.checkpoints = 0  # checkpoints written since start (not backups)

    def note_commit(self) -> None:
        """A commit was applied: the next clean stop must checkpoint it."""
        self.changed_since_checkpoint = True

    def maybe_checkpoint(self) -> None:
        """Ask for a checkpoint if the WAL grew by `checkpoint_bytes` and none is in flight."""
        if self.durability.wal_bytes >= self.checkpoint_bytes and not self.checkpoint_in_flight():
            self.request()

    def checkpoint_in_flight(self) -> bool:
        """Whether a checkpoint (not a backup) was asked for and is not written yet."""
        return any(asker is None for _, asker in self.requests.values())

    def request(self, asker: Asker | None = None, directory: str | None = None) -> None:
        """Have the persistence process write the state after the last commit as a checkpoint.

        With `directory`, it is a backup: the checkpoint goes there, the WAL is
        left alone, and `asker` is answered once it is on disk. Raises
        DurabilityFailed once the WAL failed.
        """
        if directory is None and self.checkpoint_in_flight():
            return
        seq, root = self.commits.seq, self.commits.root
        segments = self.arena.generation()
        assert not root or segment_of(root) >= self.arena.generation_start, (
            f"root {root:#x} lies outside the generation {segments} a checkpoint copies"
        )
        request_id = self.durability.request_checkpoint(
            seq=seq, root=root, segments=segments, next_segment=self.arena.next_index, directory=directory
        )
        self.requests[request_id] = (seq, asker)
        if directory is None:
            self.changed_since_checkpoint = False

    def backup(self, asker: Asker, destination: str) -> None:
        """Start a hot, consistent backup of the latest commit into a new data directory."""
        target = DataDir.open(destination)
        if any(name != STAMP for name in os.listdir(target.path)):
            raise DataDirectoryError(f"backup destination {target.path} is not empty; pass a new directory")
        if self.durability.failure:
            raise CoordinatorError(self.commits.failure_reply()[2])
        self.request(asker, target.path)

    def on_checkpointed(self, request_id: int, checkpoint_file: str) -> None:
        """The persistence process wrote request `request_id`: count it, or answer its asker.

        A report of no request in flight is ignored: a persistence process
        killed after its report and before it took the request off the ring
        leaves it to its successor, which writes it again.
        """
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        seq, asker = request
        if asker is None:
            self.checkpoints += 1
        else:
            self.connections.answer(asker, ["ok", seq, checkpoint_file])

    def pinned_seqs(self) -> list[int]:
        """The seqs whose segments requests in flight still copy."""
        return [seq for seq, _ in self.requests.values()]
