"""Per-process bounded caches keyed by AtomPointer.

`AtomObjectCache` maps a pointer to the object decoded from it (a tree node,
a frozen value, a tree view); `AtomBytesCache` maps a pointer to its atom's
(kind, payload view). Pointers are never reused, so an entry never goes stale
while its atom exists; after a compaction the old atoms are gone and the caches
are cleared.

Eviction is FIFO over dict insertion order: a hit does no bookkeeping at all,
which keeps the warm read path as short as a dict lookup. Hot entries evicted
by FIFO are decoded again from shared memory, which is cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


class _BoundedCache:
    __slots__ = ("data", "capacity", "hits", "misses")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"cache capacity must be at least 1, got {capacity}")
        self.data: dict[int, Any] = {}  # {pointer (or -pointer for views) -> cached object}
        self.capacity = capacity
        self.hits = 0
        self.misses = 0  # every miss is followed by a put

    def get(self, key: int) -> Any:
        value = self.data.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def put(self, key: int, value: Any) -> Any:
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
        self.data.clear()

    def stats(self) -> CacheStats:
        return CacheStats(type(self).__name__, len(self.data), self.capacity, self.hits, self.misses)


class AtomObjectCache(_BoundedCache):
    """pointer -> decoded object (nodes, frozen values); views under the negated pointer."""


class AtomBytesCache(_BoundedCache):
    """pointer -> (kind, payload memoryview) of an atom, skipping header checks on reuse."""
