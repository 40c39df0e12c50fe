"""Optimistic validation: which key paths changed after a given sequence number.

Owns the version table of the coordinator; runs in the coordinator process,
where commits.py consults it for each commit. A commit based on snapshot `base`
may write path P only if no commit after `base` wrote P, a prefix of P (a
container holding P was replaced) or anything below P (P holds a container
someone changed). In serializable mode the same holds for every path it read,
which rules out write skew.

Invariant: `last_write[p]` is the sequence of the latest commit that wrote p
exactly, `last_below[p]` the latest that wrote strictly below p, for every
commit after `horizon`, and `history` holds each of those commits' paths.
Entries at or before the horizon are pruned; a commit based before the
horizon is refused as a conflict, conservatively, since its history is gone
(it cannot happen while snapshots pin the reader table).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import Any

__all__ = ["VersionTable", "KeyPath"]

KeyPath = tuple[Any, ...]  # a key path from the root, ('users', 'alice', 'city'): keys are user values


class VersionTable:
    """Last-writer sequence numbers per key path."""

    def __init__(self) -> None:
        self.last_write: dict[KeyPath, int] = {}  # {path -> seq of its last exact write}
        self.last_below: dict[KeyPath, int] = {}  # {path -> seq of the last write strictly below}
        self.horizon = 0  # every write at or before this seq has been forgotten
        # (seq, paths) of every commit recorded after the horizon, oldest first: what `prune` visits,
        # so that forgetting costs what is forgotten, not the size of the table.
        self.history: collections.deque[tuple[int, list[KeyPath]]] = collections.deque()

    def first_conflict(self, base: int, paths: Iterable[KeyPath]) -> tuple[KeyPath, int] | None:
        """(path, seq) of a change after `base` that touches one of `paths`, or None."""
        if base < self.horizon:
            return (), self.horizon
        last_write, last_below = self.last_write, self.last_below
        for path in paths:
            seq = last_below.get(path, 0)
            if seq > base:
                return path, seq
            for end in range(len(path), 0, -1):
                seq = last_write.get(path[:end], 0)
                if seq > base:
                    return path[:end], seq
        return None

    def record(self, seq: int, paths: Iterable[KeyPath]) -> None:
        """Remember that commit `seq` wrote `paths`."""
        written = list(paths)
        for path in written:
            self.last_write[path] = seq
            for end in range(len(path)):
                self.last_below[path[:end]] = seq
        self.history.append((seq, written))

    def prune(self, oldest_base: int, budget: int | None = None) -> int:
        """Forget writes at or before `oldest_base`, the oldest snapshot any commit can have.

        Oldest first, and with a `budget` only that many commits' paths at a
        time (a housekeeping tick must not hold commits up): the horizon then
        stops before the first commit not yet forgotten. Returns the entries
        forgotten.
        """
        if oldest_base <= self.horizon:
            return 0
        last_write, last_below, history = self.last_write, self.last_below, self.history
        forgotten = visited = 0
        while history and history[0][0] <= oldest_base:
            if budget is not None and visited >= budget:
                self.horizon = history[0][0] - 1
                return forgotten
            seq, paths = history.popleft()
            visited += len(paths)
            for path in paths:
                if last_write.get(path) == seq:  # (else a later commit wrote it: kept)
                    del last_write[path]
                    forgotten += 1
                for end in range(len(path)):
                    if last_below.get(path[:end]) == seq:
                        del last_below[path[:end]]
                        forgotten += 1
        self.horizon = oldest_base
        return forgotten

    def __len__(self) -> int:
        return len(self.last_write)
