"""Per-process bounded caches keyed by AtomPointer.

`AtomObjectCache` maps a pointer to the object decoded from it (a tree node,
a frozen value, a tree view); `AtomBytesCache` maps a pointer to its atom's
(kind, payload view). Pointers are never reused, so an entry never goes stale
while its atom exists; after a compaction the old atoms are gone and the caches
are cleared.

Eviction is FIFO over dict insertion order: a hit does no bookkeeping at all,
which keeps the warm read path as short as a dict lookup. Hot entries evicted
by FIFO are decoded again from shared memory, which is cheap.

Each process's `Store` owns one cache of each kind (clients and the
coordinator alike); nothing here is shared between processes or locked, so
one cache serves the threads of its process under the GIL.

Invariant: a cache never holds more than `capacity` entries, and what it
holds under a pointer is what decoding that pointer's atom gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["AtomObjectCache", "AtomBytesCache", "CacheStats"]


@dataclass(frozen=True)
class CacheStats:
    """Counters of one cache."""

    name: str
    entries: int
    capacity: int
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


V = TypeVar("V")


class _BoundedCache(Generic[V]):
    """At most `capacity` entries {int key -> V}, evicted oldest first; counts hits and misses."""

    __slots__ = ("data", "capacity", "hits", "misses")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        self.data: dict[int, V] = {}  # {pointer (or -pointer for views) -> cached object}
        self.capacity = capacity
        self.hits = 0
        self.misses = 0  # every miss is followed by a put

    def get(self, key: int) -> V | None:
        """The entry under `key`, or None (a miss: the caller decodes and `put`s it)."""
        value = self.data.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: int, value: V) -> V:
        """Cache `value` under `key`, evicting the oldest sixteenth first when full; return `value`."""
        data = self.data
        if len(data) >= self.capacity:
            # Evict the oldest entries in batches: amortised O(1). Take them from one
            # iterator: `next(iter(data))` per victim rescans the deleted slots at
            # the front of the dict each time, which made eviction quadratic.
            victims = iter(data)
            for key_to_drop in [next(victims) for _ in range(max(1, self.capacity // 16))]:
                del data[key_to_drop]
        data[key] = value
        return value

    def clear(self) -> None:
        """Drop every entry (after a compaction unlinked the atoms they came from); counters stay."""
        self.data.clear()

    def stats(self) -> CacheStats:
        """The cache's counters as of now, frozen."""
        return CacheStats(type(self).__name__, len(self.data), self.capacity, self.hits, self.misses)


# Any: the decoded objects are tree nodes, views, and frozen user values of any type.
class AtomObjectCache(_BoundedCache[Any]):
    """pointer -> decoded object (nodes, frozen values); views under the negated pointer."""


class AtomBytesCache(_BoundedCache[tuple[int, memoryview]]):
    """pointer -> (kind, payload memoryview) of an atom, skipping header checks on reuse."""
