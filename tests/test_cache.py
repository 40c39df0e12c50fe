"""Tests of protobase.core.cache: the per-process caches keyed by AtomPointer.

Bounds (never more than `capacity` entries), FIFO eviction in batches of a
sixteenth (a hit does not keep an entry), and the hit and miss counters
that `db.stats()` reports, checked against a plain model.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protobase.core.cache import DEFAULT_CHARGE, AtomBytesCache, AtomObjectCache, CacheStats


@pytest.mark.parametrize("capacity", [0, -1])
def test_a_capacity_below_one_is_refused(capacity: int) -> None:
    with pytest.raises(ValueError, match=f"cache capacity must be at least 1, got {capacity}"):
        AtomObjectCache(capacity)


def test_a_miss_returns_none_and_a_put_makes_the_next_get_a_hit() -> None:
    cache = AtomObjectCache(8)
    assert cache.get(16) is None
    value = ["decoded"]
    assert cache.put(16, value) is value  # put hands back what it cached, as Store uses it
    assert cache.get(16) is value
    assert (cache.hits, cache.misses) == (1, 1)


def test_stats_are_a_frozen_record_of_the_counters() -> None:
    cache = AtomBytesCache(4)
    for ptr in (8, 16, 8, 8, 24):
        if cache.get(ptr) is None:
            cache.put(ptr, (1, memoryview(b"payload")))
    stats = cache.stats()
    assert stats == CacheStats("AtomBytesCache", entries=3, capacity=4, hits=2, misses=3, held_bytes=3 * DEFAULT_CHARGE)
    assert stats.hit_rate == pytest.approx(2 / 5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.hits = 0  # type: ignore[misc]
    cache.get(8)
    assert stats.hits == 2 and cache.stats().hits == 3  # a record, not a live view


def test_hit_rate_is_zero_before_any_lookup() -> None:
    assert AtomObjectCache(4).stats().hit_rate == 0.0


def test_a_full_cache_evicts_its_oldest_sixteenth_at_once() -> None:
    cache = AtomObjectCache(32)
    for ptr in range(32):
        cache.put(ptr, ptr)
    assert len(cache.data) == 32  # full, nothing evicted yet
    cache.put(32, 32)
    assert list(cache.data) == list(range(2, 33))  # 32 // 16 = 2 oldest entries went


def test_a_capacity_of_one_keeps_only_the_last_entry() -> None:
    cache = AtomObjectCache(1)
    for ptr in range(5):
        cache.put(ptr, str(ptr))
        assert cache.data == {ptr: str(ptr)}


def test_eviction_is_first_in_first_out_a_hit_does_not_keep_an_entry() -> None:
    cache = AtomObjectCache(16)
    for ptr in range(16):
        cache.put(ptr, ptr)
    for _ in range(100):
        assert cache.get(0) == 0
    cache.put(16, 16)
    assert cache.get(0) is None  # the most read entry was the oldest put


def test_clear_drops_every_entry_but_keeps_the_counters() -> None:
    cache = AtomObjectCache(8)
    cache.put(8, "a")
    cache.get(8)
    cache.get(16)
    cache.clear()
    assert cache.data == {}
    assert cache.get(8) is None
    assert cache.stats() == CacheStats("AtomObjectCache", entries=0, capacity=8, hits=1, misses=2)


def test_views_are_cached_under_the_negated_pointer_apart_from_the_node() -> None:
    cache = AtomObjectCache(8)
    cache.put(64, "node")
    cache.put(-64, "view")
    assert (cache.get(64), cache.get(-64)) == ("node", "view")


def test_eviction_stays_linear_when_a_large_cache_turns_over_many_times() -> None:
    # Regression: taking each victim with next(iter(data)) rescanned the deleted
    # slots at the front of the dict, so turning a large cache over was quadratic
    # (minutes for this loop); batched eviction from one iterator takes well under a second.
    cache = AtomObjectCache(1 << 16)
    started = time.monotonic()
    for ptr in range(400_000):
        cache.put(ptr, ptr)
    assert time.monotonic() - started < 20
    assert len(cache.data) <= 1 << 16
    assert cache.get(399_999) == 399_999


_operations = st.lists(st.tuples(st.booleans(), st.integers(0, 120)), min_size=60, max_size=300)


@settings(max_examples=100, deadline=None)
@given(capacity=st.integers(1, 48), operations=_operations)
def test_the_cache_matches_a_fifo_model(capacity: int, operations: list[tuple[bool, int]]) -> None:
    """Random puts and gets against an OrderedDict that evicts the same batches (even for a key it holds)."""
    cache = AtomObjectCache(capacity)
    model: OrderedDict[int, str] = OrderedDict()
    hits = misses = 0
    for is_put, ptr in operations:
        if is_put:
            if len(model) >= capacity:
                for _ in range(max(1, capacity // 16)):
                    model.popitem(last=False)
            model[ptr] = f"v{ptr}"  # a key put again keeps its place, in a dict as in the model
            cache.put(ptr, f"v{ptr}")
        else:
            expected = model.get(ptr)
            assert cache.get(ptr) == expected
            hits, misses = (hits + 1, misses) if expected is not None else (hits, misses + 1)
        assert len(cache.data) <= capacity
        assert set(cache.data) == set(model)
    assert (cache.hits, cache.misses) == (hits, misses)


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(1, 40),
    max_bytes=st.integers(1, 4_000),
    puts=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 1_500)), min_size=1, max_size=200),
)
def test_the_byte_bound_holds_and_charges_add_up(capacity: int, max_bytes: int, puts: list[tuple[int, int]]) -> None:
    """Random puts with random charges: never over either bound, held_bytes the sum of what is held,
    eviction oldest first, and an entry charged over the whole bound returned but not kept."""
    cache = AtomObjectCache(capacity, max_bytes)
    for ptr, charge in puts:
        value = f"v{ptr}-{charge}"
        order_before = list(cache.data)
        assert cache.put(ptr, value, charge) is value
        assert len(cache.data) <= capacity
        assert cache.held_bytes == sum(cache.charges.values()) <= max_bytes
        assert list(cache.data) == list(cache.charges)  # the same keys, in the same (insertion) order
        if charge > max_bytes:
            assert cache.data.get(ptr) != value
        else:
            assert cache.data[ptr] == value and cache.charges[ptr] == charge
            others = [key for key in order_before if key != ptr]
            survivors = [key for key in others if key in cache.data]
            assert survivors == others[len(others) - len(survivors) :]  # the oldest went


def test_a_put_without_a_charge_asks_the_estimate() -> None:
    cache = AtomObjectCache(8, 1_000, estimate=len)
    cache.put(1, "x" * 300)
    cache.put(2, "y" * 300)
    assert cache.held_bytes == 600
    cache.put(3, "z" * 500)  # over the bound: the oldest go until it fits, with a sixteenth of the bound to spare
    assert list(cache.data) == [2, 3] and cache.held_bytes == 800
    assert cache.stats().held_bytes == 800 and cache.stats().max_bytes == 1_000


def test_a_byte_bound_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="cache byte bound must be at least 1, got 0"):
        AtomObjectCache(8, 0)
