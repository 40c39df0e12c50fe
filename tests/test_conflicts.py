"""The version table (coordinator/conflicts.py): which key paths changed after a snapshot.

A commit based on snapshot `base` conflicts with a later write at the same
path, above it (a container holding it was replaced) or below it (something
inside it changed), and with nothing else. Pruning forgets old writes, and a
commit based before what was forgotten is refused conservatively. A property
test checks the table against a plain list of every write.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protobase.coordinator.conflicts import KeyPath, VersionTable


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
