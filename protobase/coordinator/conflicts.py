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
        self.pruned_paths = 0  # of the oldest commit in `history`, how many paths `prune` forgot already

    def first_conflict(self, base: int, paths: Iterable[KeyPath]) -> tuple[KeyPath, int] | None:
        """(path, seq) of a change after `base` that touches one of `paths`, or None."""
        if base < self.horizon:
            return (), self.horizon
        last_write, last_below = self.last_write, self.last_below
        seen: set[KeyPath] = set()  # prefixes checked already, with all of theirs (a bulk commit shares them)
        for path in paths:
            seq = max(last_below.get(path, 0), last_write.get(path, 0))
            if seq > base:
                return path, seq
            for end in range(len(path) - 1, 0, -1):
                prefix = path[:end]
                if prefix in seen:
                    break
                seen.add(prefix)
                seq = last_write.get(prefix, 0)
                if seq > base:
                    return prefix, seq
        return None

    def record(self, seq: int, paths: Iterable[KeyPath]) -> None:
        """Remember that commit `seq` wrote `paths`."""
        written = list(paths)
        last_write, last_below = self.last_write, self.last_below
        seen: set[KeyPath] = set()  # prefixes done, with all of theirs
        for path in written:
            last_write[path] = seq
            for end in range(len(path) - 1, -1, -1):
                prefix = path[:end]
                if prefix in seen:
                    break
                seen.add(prefix)
                last_below[prefix] = seq
        self.history.append((seq, written))

    def prune(self, oldest_base: int, budget: int | None = None) -> int:
        """Forget writes at or before `oldest_base`, the oldest snapshot any commit can have.

        Oldest first, and with a `budget` at most that many written paths at
        a time, so a housekeeping tick never holds commits up (a bulk commit
        is forgotten over several): the horizon covers every commit whose
        writes are forgotten, even in part. Returns the entries forgotten.
        """
        if oldest_base <= self.horizon and not (self.history and self.history[0][0] <= self.horizon):
            return 0
        history = self.history
        forgotten = visited = 0
        while history and history[0][0] <= oldest_base:
            seq, paths = history[0]
            self.horizon = max(self.horizon, seq)  # bases before it can no longer be checked
            start = self.pruned_paths
            stop = len(paths) if budget is None else min(len(paths), start + budget - visited)
            forgotten += self._forget(seq, paths[start:stop])
            visited += stop - start
            if stop < len(paths):
                self.pruned_paths = stop
                return forgotten
            history.popleft()
            self.pruned_paths = 0
            if budget is not None and visited >= budget:
                return forgotten
        self.horizon = max(self.horizon, oldest_base)
        return forgotten

    def _forget(self, seq: int, paths: list[KeyPath]) -> int:
        """Drop the entries commit `seq` left for `paths` (those no later commit overwrote); how many."""
        last_write, last_below = self.last_write, self.last_below
        forgotten = 0
        seen: set[KeyPath] = set()
        for path in paths:
            if last_write.get(path) == seq:  # (else a later commit wrote it: kept)
                del last_write[path]
                forgotten += 1
            for end in range(len(path) - 1, -1, -1):
                prefix = path[:end]
                if prefix in seen:
                    break
                seen.add(prefix)
                if last_below.get(prefix) == seq:
                    del last_below[prefix]
                    forgotten += 1
        return forgotten

    def __len__(self) -> int:
        return len(self.last_write)
