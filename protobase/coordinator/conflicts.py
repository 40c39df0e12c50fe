"""Optimistic validation: which key paths changed after a given sequence number.

Owns the version table of the coordinator; runs in the coordinator process,
where commits.py consults it for each commit. A commit based on snapshot `base`
may write path P only if no commit after `base` wrote P, a prefix of P (a
container holding P was replaced) or anything below P (P holds a container
someone changed). In serializable mode the same holds for every path it read,
which rules out write skew.

Invariant: `last_write[p]` is the sequence of the latest commit that wrote p
exactly, `last_below[p]` the latest that wrote strictly below p, for every
commit after `horizon`. Entries at or before the horizon are pruned; a commit
based before the horizon is refused as a conflict, conservatively, since its
history is gone (it cannot happen while snapshots pin the reader table).
"""

from __future__ import annotations

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
        for path in paths:
            self.last_write[path] = seq
            for end in range(len(path)):
                self.last_below[path[:end]] = seq

    def prune(self, oldest_base: int) -> int:
        """Forget writes at or before `oldest_base`, the oldest snapshot any commit can have."""
        if oldest_base <= self.horizon:
            return 0
        before = len(self.last_write) + len(self.last_below)
        self.last_write = {p: s for p, s in self.last_write.items() if s > oldest_base}
        self.last_below = {p: s for p, s in self.last_below.items() if s > oldest_base}
        self.horizon = oldest_base
        return before - len(self.last_write) - len(self.last_below)

    def __len__(self) -> int:
        return len(self.last_write)
