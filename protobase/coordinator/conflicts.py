"""Optimistic validation: which key paths changed after a given sequence number, and turns for losers.

Owns the version table of the coordinator and the reservations that keep a
client from losing one key path forever (`Reservations`); runs in the coordinator process,
where commits.py consults it for each commit. A commit based on snapshot `base`
may write path P only if no commit after `base` wrote P, a prefix of P (a
container holding P was replaced) or anything below P (P holds a container
someone changed). In serializable mode the same holds for every path it read,
which rules out write skew.

Increments (OP_INCR) commute: a commit's increment of P is applied to the
latest value of P, whatever was committed since its snapshot, so P is not
validated for it (`validated_paths`) and concurrent increments never
conflict. It is still recorded as a write of P, so a transaction that read P
and writes it (`stats["adds"] += 1`) conflicts with an increment committed
after its snapshot, and a serializable one that read P validates it as a read.

Invariant: `last_write[p]` is the sequence of the latest commit that wrote p
exactly, `last_below[p]` the latest that wrote strictly below p, for every
commit after `horizon`, and `history` holds each of those commits' paths.
Entries at or before the horizon are pruned; a commit based before the
horizon is refused as a conflict, conservatively, since its history is gone
(it cannot happen while snapshots pin the reader table).
"""

from __future__ import annotations

import collections
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from protobase.wire.opcodes import OP_INCR

__all__ = ["VersionTable", "Reservations", "KeyPath", "validated_paths"]

KeyPath = tuple[Any, ...]  # a key path from the root, ('users', 'alice', 'city'): keys are user values


def validated_paths(ops: Sequence[Sequence[Any]], paths: list[KeyPath]) -> list[KeyPath]:
    """The paths a commit's writes are validated on: every op's path but an increment's, which commutes."""
    return [path for op, path in zip(ops, paths) if op[0] != OP_INCR]


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


class Reservations:
    """Turns at a contended key path for the transactions that keep losing it: optimism without starvation.

    Optimistic validation lets whoever commits first win. On one hot path a
    client can lose again and again to faster or luckier ones (a cart app's
    shared counter: 18 conflicts in a row, a p99 of 2.4 s). So the
    coordinator counts each client's conflicts in a row; from `after_losses`
    on (2: a transaction that lost twice is one that retries, while a plain
    one that gave up after a conflict must not hold others up), and for a
    "sync" commit from the first for `contended_for` seconds after a turn of
    its own (its next transactions on the hot path, see `lost`), the client
    queues for the path it lost, and the head of the queue
    holds a turn: until it commits, or for `hold` seconds at most, no other
    client's commit writing the path (at it, above or below it) is accepted.
    Those commits are refused as conflicts, and their clients queue too
    ("sync" ones at once).

    A queued client's conflict is not answered at once: its answer is parked
    (`lost` returns True) until its turn starts (`on_turn`), so it does not
    spin on refusals meanwhile. Its retry then reads a snapshot that holds
    every write it lost to (the client waits for that commit to be
    published, database.py), finds the path unchanged and commits. So a
    client loses at most `after_losses` times plus once while it waits, and
    waits for the clients queued before it, each of which commits at its
    first retry: the run of conflicts is bounded by the queue, not by luck.
    (A client that gave up and never retries can make others lose once,
    for as long as its turn lasts; a conflict is always retryable.)
    The turn passes to the next in the queue when the holder commits
    anything, when its hold expires (a holder that gave up or died:
    `expire`, at every housekeeping tick and every commit while turns are
    held) or once it disconnected. Clients are held by weak reference: one
    that disconnected drops out of every queue, and its parked answers with it.

    Nothing of this runs while no client reached `after_losses`: `blocking`
    is one test of an empty dict per commit.

    Invariant: `holders[path]` is a client whose turn started less than
    `hold` seconds ago (`expire` enforces it); a client is in a path's queue
    at most once; every parked answer belongs to a client queued for its
    path, and is given (`on_turn`) when that client's turn starts.
    """

    def __init__(
        self,
        on_turn: Callable[[Any, Any, KeyPath], None],
        after_losses: int = 2,
        hold: float = 0.1,
        contended_for: float = 1.0,
    ) -> None:
        self.on_turn = on_turn  # on_turn(client, token, path): answer a parked conflict, its turn began
        self.after_losses = after_losses  # conflicts in a row before a client queues for its path
        self.hold = hold  # seconds a turn lasts at most
        self.contended_for = contended_for  # seconds after a turn in which one conflict is enough for the next
        self.losses: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()  # {client -> in a row}
        # {client -> time.monotonic() its last turn started}: a client retrying on a hot path
        self.contended: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self.holders: dict[KeyPath, tuple[weakref.ref[Any], float]] = {}  # {path -> (holder, turn ends at)}
        self.queues: dict[KeyPath, collections.deque[weakref.ref[Any]]] = {}  # {path -> clients waiting, in order}
        # {client -> [(token, path), ...]}: conflicts answered once the client's turn at path starts
        self.parked: weakref.WeakKeyDictionary[Any, list[tuple[Any, KeyPath]]] = weakref.WeakKeyDictionary()
        self.turns = 0  # turns given since start

    def blocking(self, client: Any, paths: Sequence[KeyPath]) -> KeyPath | None:
        """The reserved path that one of `paths` touches while another client holds it, or None."""
        if not self.holders:
            return None
        self.expire()
        for reserved, (holder, _) in self.holders.items():
            if holder() is client:
                continue
            depth = len(reserved)
            for path in paths:
                if path[:depth] == reserved or reserved[: len(path)] == path:
                    return reserved
        return None

    def lost(self, client: Any, path: KeyPath, token: Any, blocked: bool = False, eager: bool = False) -> bool:
        """Count a conflict of `client` at `path`; True if its answer waits for its turn (then `on_turn(token)`).

        `blocked`: the commit was refused for another client's turn at `path` (`blocking`).
        `eager`: queue at the first conflict if blocked, or within `contended_for` of a turn of
        its own. For "sync" commits, whose window (snapshot to commit) holds an fsync, so that
        concurrent writers of one path nearly always overlap: taking turns at once is then the
        fastest order (4 processes on one key: 2.0 attempts per transaction). An "async" commit's
        window is short: most retries win at once, and a transaction that queued at its first
        conflict would wait for a turn (two process wake-ups) it did not need.
        """
        count = self.losses.get(client, 0) + 1
        self.losses[client] = count
        now = time.monotonic()
        if count < self.after_losses and not (
            eager and (blocked or now - self.contended.get(client, -self.contended_for) < self.contended_for)
        ):
            return False
        holder = self.holders.get(path)
        if holder is not None and holder[0]() is client:
            return False  # its turn is on: this loss came from a snapshot older than its turn
        queue = self.queues.setdefault(path, collections.deque())
        if not any(waiting() is client for waiting in queue):
            queue.append(weakref.ref(client))
        if holder is None:
            self._pass_turn(path, now)
            holder = self.holders.get(path)
            if holder is not None and holder[0]() is client:
                return False  # its turn, at once
        self.parked.setdefault(client, []).append((token, path))
        return True

    def won(self, client: Any) -> None:
        """`client` committed: its run of losses ends, and so do its turns."""
        if self.losses.pop(client, None) is None or not self.holders:
            return
        now = time.monotonic()
        for reserved in [path for path, (holder, _) in self.holders.items() if holder() is client]:
            self._pass_turn(reserved, now)

    def expire(self) -> None:
        """End the turns whose hold is over or whose holder is gone."""
        now = time.monotonic()
        for reserved in [path for path, (holder, ends) in self.holders.items() if ends < now or holder() is None]:
            self._pass_turn(reserved, now)

    def _pass_turn(self, path: KeyPath, now: float) -> None:
        """End the turn at `path` (if any) and give the next live client in its queue one."""
        self.holders.pop(path, None)
        queue = self.queues.get(path)
        while queue:
            client = queue.popleft()()
            if client is not None:
                self.holders[path] = (weakref.ref(client), now + self.hold)
                self.contended[client] = now
                self.turns += 1
                self._answer_parked(client, path)
                break
        if not queue:
            self.queues.pop(path, None)

    def _answer_parked(self, client: Any, path: KeyPath) -> None:
        parked = self.parked.get(client)
        if not parked:
            return
        waiting = [(token, at) for token, at in parked if at == path]
        parked[:] = [(token, at) for token, at in parked if at != path]
        if not parked:
            del self.parked[client]
        for token, at in waiting:
            self.on_turn(client, token, at)
