"""The version table (coordinator/conflicts.py): which key paths changed after a snapshot.

A commit based on snapshot `base` conflicts with a later write at the same
path, above it (a container holding it was replaced) or below it (something
inside it changed), and with nothing else. Pruning forgets old writes, and a
commit based before what was forgotten is refused conservatively. A property
test checks the table against a plain list of every write.

Reservations give a client that keeps losing a path a turn at it: its own
commits go through, every other client's write at, above or below the path
is refused until the turn ends (it commits, its hold expires, it is gone),
and turns pass in the order the losers queued. Increments are not validated
(`validated_paths`).
"""

from __future__ import annotations

import gc
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from protobase.coordinator import conflicts
from protobase.coordinator.conflicts import KeyPath, Reservations, VersionTable, validated_paths
from protobase.wire.opcodes import OP_INCR, OP_SET


def table(*writes: tuple[int, list[KeyPath]]) -> VersionTable:
    versions = VersionTable()
    for seq, paths in writes:
        versions.record(seq, paths)
    return versions


def test_a_write_after_the_base_conflicts_at_the_path_above_it_and_below_it():
    versions = table((1, [("users", "alice", "city")]), (2, [("orders",)]))
    assert versions.first_conflict(0, [("users", "alice", "city")]) == (("users", "alice", "city"), 1)
    assert versions.first_conflict(0, [("users", "alice", "city", "zip")]) == (("users", "alice", "city"), 1)
    assert versions.first_conflict(0, [("users",)]) == (("users",), 1)  # something below it changed
    assert versions.first_conflict(0, [("orders", 7)]) == (("orders",), 2)  # its container was replaced


def test_no_conflict_with_writes_at_or_before_the_base_nor_with_siblings():
    versions = table((1, [("users", "alice")]), (2, [("users", "bob")]))
    assert versions.first_conflict(1, [("users", "alice")]) is None  # written at the base: seen by it
    assert versions.first_conflict(1, [("users", "carol"), ("other",)]) is None
    assert versions.first_conflict(0, [("users", "carol")]) is None
    assert versions.first_conflict(1, [("users", "bob")]) == (("users", "bob"), 2)


def test_the_first_path_that_conflicts_is_named():
    versions = table((3, [("b",)]), (4, [("a",)]))
    assert versions.first_conflict(0, [("c",), ("b", 1), ("a",)]) == (("b",), 3)


def test_pruning_forgets_old_writes_and_refuses_commits_based_before_the_horizon():
    versions = table((1, [("a",)]), (2, [("b", "x")]), (3, [("c",)]))
    assert len(versions) == 3
    forgotten = versions.prune(2)
    assert forgotten == 3  # ('a',) and ('b', 'x') written, ('b',) written below; () was last written below at 3
    assert (versions.horizon, len(versions)) == (2, 1)
    assert versions.first_conflict(2, [("a",), ("b", "x")]) is None
    assert versions.first_conflict(2, [("c",)]) == (("c",), 3)
    assert versions.first_conflict(1, [("unrelated",)]) == ((), 2)  # its history is gone: a conflict
    assert versions.prune(1) == 0 and versions.horizon == 2  # never backwards


def test_a_horizon_set_at_start_refuses_older_bases():
    versions = VersionTable()
    versions.horizon = 10  # a restarted coordinator: commits up to 10 are not in the table
    assert versions.first_conflict(9, [("k",)]) == ((), 10)
    assert versions.first_conflict(10, [("k",)]) is None


KEYS = st.sampled_from(["a", "b", 1])
PATHS = st.lists(KEYS, min_size=1, max_size=3).map(tuple)


def overlaps(one: KeyPath, other: KeyPath) -> bool:
    return one[: len(other)] == other or other[: len(one)] == one


@given(
    st.lists(st.lists(PATHS, min_size=1, max_size=3), max_size=8),
    st.integers(0, 8),
    st.lists(PATHS, min_size=1, max_size=3),
)
def test_a_conflict_is_reported_exactly_when_a_later_write_overlaps_a_path(commits, base, paths):
    versions = table(*((seq, written) for seq, written in enumerate(commits, start=1)))
    overlapping = [
        seq
        for seq, written in enumerate(commits, start=1)
        if seq > base and any(overlaps(path, other) for path in paths for other in written)
    ]
    conflict = versions.first_conflict(base, paths)
    assert (conflict is not None) == bool(overlapping)
    if conflict is not None:
        path, seq = conflict
        assert seq in overlapping and any(overlaps(path, other) for other in paths)


# -- increments are not validated --------------------------------------------------------------


def test_an_increments_path_is_not_validated_but_every_other_write_is():
    ops = [[OP_SET, ["a"], 1], [OP_INCR, ["stats", "adds"], 1], [OP_SET, ["b"], 2]]
    assert validated_paths(ops, [("a",), ("stats", "adds"), ("b",)]) == [("a",), ("b",)]


# -- reservations: turns for repeated losers -------------------------------------------------------


class Client:
    """Stands for a coordinator's connection: anything that can be weakly referenced."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


class Turns:
    """Reservations whose parked answers are recorded as (client, token, path), in the order given."""

    def __init__(self, **options: Any) -> None:
        self.given: list[tuple[Any, Any, KeyPath]] = []
        self.reservations = Reservations(
            lambda client, token, path: self.given.append((client, token, path)), **options
        )


def test_a_client_gets_a_turn_after_losing_a_path_as_often_as_it_takes():
    turns, alice, bob = Turns(after_losses=3), Client("alice"), Client("bob")
    reservations = turns.reservations
    assert not reservations.lost(alice, ("stats", "adds"), "a1")  # answered at once
    assert not reservations.lost(alice, ("stats", "adds"), "a2")
    assert reservations.blocking(bob, [("stats", "adds")]) is None  # two losses: no turn yet
    assert not reservations.lost(alice, ("stats", "adds"), "a3")  # its turn starts now: answered at once
    assert reservations.turns == 1 and turns.given == []
    assert reservations.blocking(bob, [("stats", "adds")]) == ("stats", "adds")
    assert reservations.blocking(bob, [("stats",)]) == ("stats", "adds")  # above it: replaces it
    assert reservations.blocking(bob, [("stats", "adds", "x")]) == ("stats", "adds")  # below it
    assert reservations.blocking(bob, [("stats", "views"), ("carts", "u1")]) is None  # siblings are free
    assert reservations.blocking(alice, [("stats", "adds")]) is None  # the holder's own commit goes through


def test_a_win_ends_the_run_of_losses_and_the_turn():
    turns, alice, bob = Turns(after_losses=2, contended_for=0.0), Client("alice"), Client("bob")
    reservations = turns.reservations
    reservations.lost(alice, ("k",), 1)
    reservations.lost(alice, ("k",), 2)
    reservations.won(alice)
    assert reservations.blocking(bob, [("k",)]) is None and not reservations.holders
    reservations.lost(alice, ("k",), 3)  # counted afresh: one in a row is not enough
    assert reservations.blocking(bob, [("k",)]) is None


def test_queued_losers_are_answered_one_by_one_as_their_turns_start():
    turns = Turns(after_losses=1)
    reservations = turns.reservations
    first, second, third = Client("first"), Client("second"), Client("third")
    assert not reservations.lost(first, ("k",), "f")  # the first gets the turn, answered at once
    assert reservations.lost(second, ("k",), "s")  # the others wait, unanswered
    assert reservations.lost(third, ("k",), "t")
    assert turns.given == []
    reservations.won(first)
    assert turns.given == [(second, "s", ("k",))]
    assert reservations.blocking(second, [("k",)]) is None and reservations.blocking(first, [("k",)]) == ("k",)
    reservations.won(second)
    assert turns.given[1:] == [(third, "t", ("k",))]
    reservations.won(third)
    assert not reservations.holders and not reservations.queues and not reservations.parked


def test_a_commit_refused_for_another_clients_turn_queues_behind_it():
    turns, alice, bob = Turns(after_losses=1), Client("alice"), Client("bob")
    reservations = turns.reservations
    reservations.lost(alice, ("k",), "a")
    blocked = reservations.blocking(bob, [("k", "x")])
    assert blocked == ("k",)
    assert reservations.lost(bob, blocked, "b")  # parked until alice's turn ends
    reservations.won(alice)
    assert turns.given == [(bob, "b", ("k",))]


def test_a_turn_ends_when_its_hold_expires(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(conflicts.time, "monotonic", lambda: now[0])
    turns, alice, bob = Turns(after_losses=1, hold=0.1), Client("alice"), Client("bob")
    reservations = turns.reservations
    reservations.lost(alice, ("k",), "a")
    reservations.lost(bob, ("k",), "b")
    now[0] += 0.09
    reservations.expire()
    assert turns.given == [] and reservations.blocking(bob, [("k",)]) == ("k",)
    now[0] += 0.02  # alice gave up (or stalled): bob's turn
    reservations.expire()
    assert turns.given == [(bob, "b", ("k",))]
    assert reservations.blocking(alice, [("k",)]) == ("k",)


def test_a_client_that_is_gone_drops_out_of_the_turns_and_its_answers_with_it():
    turns, bob = Turns(after_losses=1), Client("bob")
    reservations = turns.reservations
    alice, carol = Client("alice"), Client("carol")
    reservations.lost(alice, ("k",), "a")
    reservations.lost(carol, ("k",), "c")
    del alice, carol
    gc.collect()
    assert reservations.blocking(bob, [("k",)]) is None
    assert not reservations.holders and not reservations.queues and turns.given == []
    assert len(reservations.losses) == 0 and len(reservations.parked) == 0


def test_by_default_a_second_loss_in_a_row_queues_and_a_sync_commits_first_may(monkeypatch):
    """A plain transaction that lost once and gave up holds nobody up; a client retrying on a hot path does."""
    now = [100.0]
    monkeypatch.setattr(conflicts.time, "monotonic", lambda: now[0])
    turns, alice, bob = Turns(), Client("alice"), Client("bob")
    reservations = turns.reservations
    assert not reservations.lost(alice, ("k",), "a1", eager=True)
    assert reservations.blocking(bob, [("k",)]) is None  # one conflict: no turn
    assert not reservations.lost(alice, ("k",), "a2")  # the second in a row: alice's turn
    assert reservations.blocking(bob, [("k",)]) == ("k",)
    assert not reservations.lost(bob, ("k",), "b1")  # blocked, "async": answered, it retries
    assert reservations.lost(bob, ("k",), "b2")  # the second in a row: parked
    reservations.won(alice)
    reservations.won(bob)
    now[0] += 0.5
    assert not reservations.lost(alice, ("k",), "a3")  # "async": counted afresh
    assert reservations.blocking(bob, [("k",)]) is None
    assert not reservations.lost(alice, ("k",), "a4", eager=True)  # "sync", a turn 0.5 s ago: queues at once
    assert reservations.blocking(bob, [("k",)]) == ("k",)
    assert reservations.lost(bob, ("k",), "b3", blocked=True, eager=True)  # "sync" and blocked: parked at once
    reservations.won(alice)
    assert turns.given == [(bob, "b2", ("k",)), (bob, "b3", ("k",))]
    reservations.won(bob)
    now[0] += 2.0
    reservations.lost(alice, ("k",), "a5", eager=True)  # two seconds later: counted afresh
    assert reservations.blocking(bob, [("k",)]) is None


def test_pruning_with_a_budget_forgets_the_oldest_first_and_stops_the_horizon_before_the_rest():
    versions = table((1, [("a",), ("b",)]), (2, [("c",)]), (3, [("a",)]), (4, [("d",)]))
    assert versions.prune(3, budget=2) == 1  # commit 1's two paths: ('b',) gone, ('a',) kept (rewritten at 3)
    assert versions.horizon == 1 and versions.last_write == {("a",): 3, ("c",): 2, ("d",): 4}
    assert versions.first_conflict(1, [("c",)]) == (("c",), 2)  # still known: bases from 1 on are checked
    assert versions.first_conflict(0, [("x",)]) == ((), 1)
    versions.prune(3, budget=2)
    assert versions.horizon == 3 and versions.last_write == {("d",): 4}


@given(
    st.lists(st.lists(PATHS, min_size=1, max_size=3), max_size=10),
    st.lists(st.tuples(st.integers(0, 10), st.one_of(st.none(), st.integers(1, 4))), max_size=6),
)
def test_pruning_in_any_steps_leaves_exactly_the_writes_after_the_horizon(commits, prunes):
    versions = table(*((seq, written) for seq, written in enumerate(commits, start=1)))
    for oldest, budget in prunes:
        versions.prune(oldest, budget)
        if versions.pruned_paths:  # a commit forgotten in part lies at or before the horizon
            assert versions.history[0][0] <= versions.horizon
    versions.prune(versions.horizon)  # the rest of one forgotten in part
    kept = table(*((seq, written) for seq, written in enumerate(commits, start=1) if seq > versions.horizon))
    assert (versions.last_write, versions.last_below) == (kept.last_write, kept.last_below)
    assert versions.pruned_paths == 0 and all(seq > versions.horizon for seq, _ in versions.history)


def test_a_bulk_commit_is_forgotten_over_several_prunes_and_refuses_bases_before_it_at_once():
    versions = table((1, [("a",)]), (2, [("users", key) for key in range(10)]), (3, [("b",)]))
    versions.prune(2, budget=4)  # commit 1, and 3 of commit 2's paths
    assert versions.horizon == 2 and versions.pruned_paths == 3
    assert versions.first_conflict(1, [("zzz",)]) == ((), 2)  # its entries are going: bases before it refused
    assert versions.first_conflict(2, [("b",)]) == (("b",), 3)
    versions.prune(2, budget=4)
    versions.prune(2, budget=4)
    assert versions.pruned_paths == 0 and set(versions.last_write) == {("b",)}
